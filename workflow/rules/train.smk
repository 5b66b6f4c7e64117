rule train:
    """Train the conditional WGAN-GP; resumes from <results_dir>/train/state/ after a crash."""
    input:
        res("ingest/dataset.h5"),
    output:
        generator=res("train/generator.pt"),
        history=res("train/history.jsonl"),
        summary=res("train/summary.json"),
    params:
        settings={k: config.get(k) for k in ("seed", "device", "train")},
    log:
        res("logs/train.log"),
    benchmark:
        res("benchmarks/train.tsv")
    threads: 32  # as many as --cores allows (Snakemake scales it down); not workflow.cores, which breaks --report
    resources:
        gpu=1,  # `--resources gpu=1` keeps two GPU jobs off one card
    shell:
        # Snakemake reruns this rule when its input or settings changed: a checkpoint in
        # <results_dir>/train/state/ made with other settings is then stale, and training starts over
        # (a rerun with the same settings, after a crash or kill, resumes). The CLI alone refuses
        # such a checkpoint unless told to restart.
        "python -m surrogate.train --config {RESOLVED_CONFIG} --dataset {input} --out {RESULTS}/train"
        " --threads {threads} --set train.on_incompatible_checkpoint=restart 2> {log}"

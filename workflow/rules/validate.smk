rule validate:
    """Physics distributions and mode coverage against the held-out test split."""
    input:
        dataset="results/ingest/dataset.h5",
        generated="results/generate/events.h5",
        history="results/train/history.jsonl",
    output:
        summary="results/validate/summary.json",
        html=report("results/validate/report.html", caption="../report/validate.rst", category="Validation"),
        plots=report(
            directory("results/validate/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Validation",
        ),
    params:
        settings={k: config.get(k) for k in ("seed", "validate")},
    log:
        "results/logs/validate.log",
    benchmark:
        "results/benchmarks/validate.tsv"
    threads: 32  # as many as --cores allows (Snakemake scales it down); not workflow.cores, which breaks --report
    shell:
        "python -m surrogate.validate --config {RESOLVED_CONFIG} --dataset {input.dataset}"
        " --generated {input.generated} --history {input.history} --out results/validate"
        " --threads {threads} 2> {log}"

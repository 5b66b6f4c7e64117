SHARDS = list(range(config["generate"]["shards"]))


wildcard_constraints:
    i=r"\d+",


rule generate_shard:
    """One independent shard of generated events (its seed spawned from the run seed)."""
    input:
        generator=res("train/generator.pt"),
        dataset=res("ingest/dataset.h5"),
    output:
        res("generate/shard-{i}.h5"),
    params:
        settings={k: config.get(k) for k in ("seed", "generate")},
        shards=len(SHARDS),
    log:
        res("logs/generate-{i}.log"),
    benchmark:
        res("benchmarks/generate-{i}.tsv")
    threads: 2  # one for the forward pass, one for the compressing writer thread
    resources:
        gpu=1,  # only binds with `--resources gpu=N`: then at most N shards share the GPUs
    shell:
        "python -m surrogate.generate --config {RESOLVED_CONFIG} --generator {input.generator}"
        " --dataset {input.dataset} --out {output} --shard {wildcards.i} --shards {params.shards}"
        " --threads {threads} 2> {log}"


rule generate:
    """Join the shards into one HDF5 virtual dataset (no copy)."""
    input:
        expand(res("generate/shard-{i}.h5"), i=SHARDS),
    output:
        res("generate/events.h5"),
    log:
        res("logs/generate-join.log"),
    benchmark:
        res("benchmarks/join.tsv")
    shell:
        "python -m surrogate.generate join --shards {input} --out {output} 2> {log}"


rule generate_heldout:
    """Events at the conditions of a held-out split (ingest.holdout): generate.holdout_events in one file."""
    input:
        generator=res("train/generator.pt"),
        dataset=res("ingest/dataset.h5"),
    output:
        res("generate/{split}.h5"),
    wildcard_constraints:
        split="unseen|extrapolation",
    params:
        settings={k: config.get(k) for k in ("seed", "generate")},
    log:
        res("logs/generate-{split}.log"),
    benchmark:
        res("benchmarks/generate_heldout-{split}.tsv")  # not generate-*: those are the shards of events.h5
    threads: 2
    resources:
        gpu=1,
    shell:
        "python -m surrogate.generate --config {RESOLVED_CONFIG} --generator {input.generator}"
        " --dataset {input.dataset} --split {wildcards.split} --out {output} --threads {threads} 2> {log}"

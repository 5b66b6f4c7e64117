rule validate_floors:
    """Real-vs-real floors of the test split: they depend on the data, not on the generator (runs beside training)."""
    input:
        dataset=res("ingest/dataset.h5"),
    output:
        res("validate/floors.json"),
    params:
        settings={k: config.get(k) for k in ("seed", "validate")},
        # the stage trusts floors only from the same code (their identity hashes it): recompute them here.
        # The names of surrogate.validation.floors.FLOOR_SOURCES (a test checks that they are the same)
        code=source_hash(
            "surrogate.features", "surrogate.geometry", "surrogate.metrics", "surrogate.stream", "surrogate.validation"
        ),
    log:
        res("logs/validate-floors.log"),
    benchmark:
        res("benchmarks/validate-floors.tsv")
    threads: 32  # as many as --cores allows (Snakemake scales it down)
    shell:
        "python -m surrogate.validate floors --config {RESOLVED_CONFIG} --dataset {input.dataset}"
        " --out {output} --threads {threads} 2> {log}"


rule validate_floors_heldout:
    """Real-vs-real floors of a held-out split (ingest.holdout), beside training."""
    input:
        dataset=res("ingest/dataset.h5"),
    output:
        res("validate/floors-{split}.json"),
    wildcard_constraints:
        split="unseen|extrapolation",
    params:
        settings={k: config.get(k) for k in ("seed", "validate")},
        code=rules.validate_floors.params.code,
    log:
        res("logs/validate-floors-{split}.log"),
    benchmark:
        res("benchmarks/validate-floors-{split}.tsv")
    threads: 32
    shell:
        "python -m surrogate.validate floors --config {RESOLVED_CONFIG} --dataset {input.dataset}"
        " --split {wildcards.split} --out {output} --threads {threads} 2> {log}"


rule validate:
    """Physics distributions and mode coverage against the held-out test split (and the held-out conditions)."""
    input:
        dataset=res("ingest/dataset.h5"),
        generated=res("generate/events.h5"),
        floors=res("validate/floors.json"),
        history=res("train/history.jsonl"),
        heldout=expand(res("generate/{split}.h5"), split=HELDOUT),
        heldout_floors=expand(res("validate/floors-{split}.json"), split=HELDOUT),
    output:
        summary=res("validate/summary.json"),
        html=report(res("validate/report.html"), caption="../report/validate.rst", category="Validation"),
        plots=report(
            directory(res("validate/plots")),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Validation",
        ),
    params:
        settings={k: config.get(k) for k in ("seed", "validate")},
        heldout="".join(
            f" --{s} {RESULTS}/generate/{s}.h5 --{s}-floors {RESULTS}/validate/floors-{s}.json" for s in HELDOUT
        ),
    log:
        res("logs/validate.log"),
    benchmark:
        res("benchmarks/validate.tsv")
    threads: 32  # as many as --cores allows (Snakemake scales it down); not workflow.cores, which breaks --report
    shell:
        "python -m surrogate.validate --config {RESOLVED_CONFIG} --dataset {input.dataset}"
        " --generated {input.generated} --floors {input.floors} --history {input.history} --out {RESULTS}/validate"
        "{params.heldout} --threads {threads} 2> {log}"

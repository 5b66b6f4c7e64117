rule ingest:
    """Check, preprocess and split the simulation files into <results_dir>/ingest/dataset.h5."""
    input:
        ingest_inputs,
    output:
        dataset=res("ingest/dataset.h5"),
        manifest=res("ingest/manifest.json"),
    params:
        settings={k: config[k] for k in ("seed", "geometry", "ingest", "preprocess")},
        inputs=lambda wc, input: " ".join(f"--input {f}" for f in input),
    log:
        res("logs/ingest.log"),
    benchmark:
        res("benchmarks/ingest.tsv")
    shell:
        "python -m surrogate.ingest --config {RESOLVED_CONFIG} {params.inputs}"
        " --out {RESULTS}/ingest 2> {log}"

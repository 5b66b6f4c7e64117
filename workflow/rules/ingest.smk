rule ingest:
    """Check, preprocess and split the simulation files into results/ingest/dataset.h5."""
    input:
        ingest_inputs,
    output:
        dataset="results/ingest/dataset.h5",
        manifest="results/ingest/manifest.json",
    params:
        settings={k: config[k] for k in ("seed", "geometry", "ingest", "preprocess")},
        inputs=lambda wc, input: " ".join(f"--input {f}" for f in input),
    log:
        "results/logs/ingest.log",
    benchmark:
        "results/benchmarks/ingest.tsv"
    shell:
        "python -m surrogate.ingest --config {RESOLVED_CONFIG} {params.inputs}"
        " --out results/ingest 2> {log}"

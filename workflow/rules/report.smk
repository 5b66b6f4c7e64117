rule report:
    """Log the whole run to MLflow (the only stage that touches the tracking store)."""
    input:
        res("validate/summary.json"),
        res("train/generator.pt"),
        res("ingest/manifest.json"),
        res("generate/events.h5"),
        res("export/generator.onnx"),
    output:
        res("report/mlflow_run.json"),
    params:
        settings=config.get("report"),
    log:
        res("logs/report.log"),
    benchmark:
        res("benchmarks/report.tsv")
    shell:
        "python -m surrogate.report --config {RESOLVED_CONFIG} --results {RESULTS} --out {RESULTS}/report 2> {log}"

rule report:
    """Log the whole run to MLflow (the only stage that touches the tracking store)."""
    input:
        "results/validate/summary.json",
        "results/train/generator.pt",
        "results/ingest/manifest.json",
        "results/generate/events.h5",
        "results/export/generator.onnx",
    output:
        "results/report/mlflow_run.json",
    params:
        settings=config.get("report"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    shell:
        "python -m surrogate.report --config {RESOLVED_CONFIG} --results results --out results/report 2> {log}"

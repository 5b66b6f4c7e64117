rule simulate:
    """Reference shower simulator: writes the embedded default data set."""
    output:
        config["simulate"]["output"],
    params:
        # rerun when the physics or the sample changes
        settings={k: config[k] for k in ("seed", "geometry", "material", "simulate")},
    log:
        res("logs/simulate.log"),
    benchmark:
        res("benchmarks/simulate.tsv")
    threads: 2
    shell:
        "python -m surrogate.simulate --config {RESOLVED_CONFIG} --out {output}"
        " --set simulate.workers={threads} 2> {log}"

rule export:
    """The generator as one ONNX graph (raw conditions and latents in, showers in MeV out) for C++ frameworks."""
    input:
        generator=res("train/generator.pt"),
        dataset=res("ingest/dataset.h5"),  # read for the readout threshold, as generate does
    output:
        onnx=res("export/generator.onnx"),
        summary=res("export/generator.json"),
    params:
        # what sets the readout threshold in the graph (surrogate.generate.stage_threshold)
        settings={
            "seed": config.get("seed"),
            "threshold_mev": config["generate"]["threshold_mev"],
            "simulated_threshold_mev": config["simulate"].get("readout_threshold_mev"),
            "inputs": config["ingest"]["inputs"],
        },
    log:
        res("logs/export.log"),
    benchmark:
        res("benchmarks/export.tsv")
    threads: 1
    shell:
        "python -m surrogate.export --config {RESOLVED_CONFIG} --generator {input.generator}"
        " --dataset {input.dataset} --out {output.onnx} --threads {threads} 2> {log}"

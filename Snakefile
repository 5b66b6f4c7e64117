# The surrogate pipeline: simulate -> ingest -> train -> generate -> validate -> report (train -> export -> report).
# Rules live in workflow/rules/ (one file per stage); logic lives in the `surrogate` package.
from snakemake.utils import min_version, validate

min_version("9.0")

configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


rule all:
    """The whole pipeline: simulate -> ingest -> train -> generate -> validate -> report, and the ONNX export."""
    input:
        res("report/mlflow_run.json"),
        res("export/generator.onnx"),

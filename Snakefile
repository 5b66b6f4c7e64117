# The surrogate pipeline: simulate -> ingest -> train -> generate -> validate -> report.
# Rules live in workflow/rules/ (one file per stage); logic lives in the `surrogate` package.
from snakemake.utils import min_version, validate

min_version("9.0")

configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/ingest.smk"


rule all:
    input:
        "results/ingest/dataset.h5",
        "results/ingest/manifest.json",

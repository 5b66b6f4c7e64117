# Shared definitions for the rules.
import yaml
from pathlib import Path

# Stages read the config Snakemake resolved (config file + `--config` overrides + schema
# defaults), written once per invocation; it is rewritten only when its content changes,
# so its modification time does not trigger reruns.
RESOLVED_CONFIG = "results/config.resolved.yaml"
_text = yaml.safe_dump(config, sort_keys=False)
_path = Path(RESOLVED_CONFIG)
if not _path.exists() or _path.read_text() != _text:
    _path.parent.mkdir(parents=True, exist_ok=True)
    _tmp = _path.with_suffix(".tmp")
    _tmp.write_text(_text)
    _tmp.replace(_path)


def ingest_inputs(wildcards=None):
    """The configured input files, or the reference simulator's output when none are given."""
    return config["ingest"]["inputs"] or [config["simulate"]["output"]]

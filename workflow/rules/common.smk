# Shared definitions for the rules.
import yaml
from pathlib import Path

# Every output of a run lies under `results_dir` (config; default results/), so a preset with its own
# folder (config/calochallenge-ds2.yaml) never overwrites the default run's outputs.
RESULTS = str(config.get("results_dir", "results")).rstrip("/")


def res(path):
    """``path`` inside the run's results folder (``results_dir``): res("ingest/dataset.h5")."""
    return f"{RESULTS}/{path}"


# Stages read the config Snakemake resolved (config file + `--config` overrides + schema
# defaults), written once per invocation; it is rewritten only when its content changes,
# so its modification time does not trigger reruns.
RESOLVED_CONFIG = res("config.resolved.yaml")
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


def heldout_splits():
    """The held-out splits of ingest.holdout (unseen, extrapolation; none by default): each gets its own
    generated file and floors, and validate judges it on its own."""
    from surrogate.holdout import regions_from_config, split_names

    return list(split_names(regions_from_config(config)))


HELDOUT = heldout_splits()


def source_hash(*modules):
    """sha256 of the installed modules' source (a package: every .py file in it, sorted), as a rule
    parameter: a change to the code that computes a result reruns the rule (Snakemake does not track
    the package's code by itself). The same digest as surrogate.validation.floors.source_digest."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec.submodule_search_locations:
            files = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))
        else:
            files = [Path(spec.origin)]
        for path in files:
            h.update(path.read_bytes())
    return h.hexdigest()


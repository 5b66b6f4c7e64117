"""Config loading: the file, overrides and the schema agree; bad keys and types are named."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from surrogate.config import ConfigError, apply_overrides, load_config, parse_stage_args, stage_parser, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
# stage -> the arguments it requires besides --config
STAGES = {
    "simulate": ["--out", "x.h5"],
    "ingest": ["--input", "x.h5", "--out", "x"],
    "train": ["--dataset", "x.h5", "--out", "x"],
    "generate": ["--generator", "x.pt", "--out", "x.h5"],
    "validate": ["--dataset", "x.h5", "--generated", "y.h5", "--out", "x"],
    "report": ["--results", "x", "--out", "y"],
}


def test_default_config_is_valid():
    cfg = load_config(CONFIG)
    assert cfg["seed"] == yaml.safe_load(CONFIG.read_text())["seed"]


def test_every_config_key_is_commented():
    """config.yaml documents each key it sets (a comment on the line or the line before)."""
    lines = CONFIG.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- {"):
            continue
        if ":" in stripped and "#" not in line and not lines[i - 1].strip().startswith("#"):
            # a section header with children below is documented by its children
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            indent = len(line) - len(line.lstrip())
            if not (stripped.endswith(":") and len(nxt) - len(nxt.lstrip()) > indent):
                missing.append(f"line {i + 1}: {stripped}")
    assert not missing, "config keys without a comment:\n" + "\n".join(missing)


def test_override_sets_value_and_parses_yaml():
    cfg = load_config(CONFIG, ["simulate.events=123", "simulate.eta.max=1.0", "ingest.inputs=[a.h5, b.h5]"])
    assert cfg["simulate"]["events"] == 123
    assert cfg["simulate"]["eta"]["max"] == 1.0
    assert cfg["ingest"]["inputs"] == ["a.h5", "b.h5"]


def test_override_reads_exponent_floats_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads "4e-4" as text; people type it on the command line
    cfg = load_config(CONFIG, ["train.lr_g=4e-4", "train.lr_d=1E3", "report.run_name=1e3x"])
    assert cfg["train"]["lr_g"] == 4e-4 and cfg["train"]["lr_d"] == 1000.0
    assert cfg["report"]["run_name"] == "1e3x"
    # in a file the reading stays PyYAML's (Snakemake validates the same text), with a hint
    text, n = re.subn(r"(?m)^  lr_g: \S+", "  lr_g: 4e-4", CONFIG.read_text())
    assert n == 1
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"train\.lr_g: '4e-4' is not of type 'number' \(YAML reads 4e-4 as text"):
        load_config(tmp_path / "c.yaml")


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"simulate\.evnts"):
        load_config(CONFIG, ["simulate.evnts=3"])
    with pytest.raises(ConfigError, match=r"bogus"):
        validate_config({**load_config(CONFIG), "bogus": 1})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"simulate\.events: 'abc' is not of type 'integer'"):
        load_config(CONFIG, ["simulate.events=abc"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["no_equals_sign"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_snakemake_validation_matches(tmp_path):
    """Snakemake's validate() accepts the default config and rejects the unknown key the CLI rejects."""
    from snakemake.utils import validate

    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    good = yaml.safe_load(CONFIG.read_text())
    validate(good, str(schema))
    bad = apply_overrides(good, ["simulate.evnts=3"])
    with pytest.raises(Exception, match="evnts"):
        validate(bad, str(schema))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_cli_help(stage):
    out = subprocess.run([sys.executable, "-m", f"surrogate.{stage}", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--set" in out.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_stage_cli_rejects_unknown_key(stage, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            f"surrogate.{stage}",
            "--config",
            str(CONFIG),
            "--set",
            "simulate.nonsense_key=1",
            *STAGES[stage],
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "nonsense_key" in out.stderr
    assert not any(tmp_path.iterdir()), "a rejected config must write nothing"


def test_config_files_overlay_in_order(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  steps: 7\n  generator: {width: 32}\n")
    cfg = load_config([CONFIG, preset], ["train.max_minutes=1.5"])
    base = load_config(CONFIG)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["generator"]["width"] == 32
    # sections merge key by key: untouched keys keep the base file's values
    assert cfg["train"]["generator"]["depth"] == base["train"]["generator"]["depth"]
    assert cfg["train"]["batch_size"] == base["train"]["batch_size"] and cfg["train"]["max_minutes"] == 1.5
    preset.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config([CONFIG, preset])


def test_stage_cli_takes_config_overlays(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("simulate:\n  events: 123\n")
    parser = stage_parser("prog", "d")
    args, cfg = parse_stage_args(parser, ["--config", str(CONFIG), "--config", str(preset)])
    assert cfg["simulate"]["events"] == 123
    args, cfg = parse_stage_args(stage_parser("prog", "d"), ["--config", str(CONFIG)])
    assert cfg["simulate"]["events"] == load_config(CONFIG)["simulate"]["events"]

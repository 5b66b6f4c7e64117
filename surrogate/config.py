"""Configuration: load ``config.yaml``, apply ``--set`` overrides, validate against the JSON schema.

The same schema file (``workflow/schemas/config.schema.yaml``) validates the config in the
Snakefile and in every stage CLI, so a key that Snakemake accepts is a key the stages accept.
Unknown keys and wrong types are errors that name the dotted key.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from surrogate.io import setup_logging

__all__ = [
    "ConfigError",
    "SCHEMA_PATH",
    "load_config",
    "validate_config",
    "apply_overrides",
    "stage_parser",
    "parse_stage_args",
    "dump_config",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


def _load_schema() -> dict[str, Any]:
    if not SCHEMA_PATH.exists():
        raise ConfigError(
            f"config schema not found at {SCHEMA_PATH}: install the package from a checkout with `pip install -e .`"
        )
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator_with_defaults(schema: dict[str, Any]):
    """A jsonschema validator that fills in ``default`` values, as Snakemake's ``validate`` does."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema_)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def validate_config(cfg: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate (and fill defaults into) a copy of ``cfg``; raise ConfigError naming the bad key."""
    cfg = copy.deepcopy(cfg)
    validator = _validator_with_defaults(_load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            if err.validator == "additionalProperties":
                extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
                prefix = f"{key}." if err.absolute_path else ""
                lines.append(f"{source}: unknown key(s) {', '.join(prefix + k for k in extra)}")
            else:
                hint = ""
                if err.validator == "type" and isinstance(err.instance, str) and _looks_numeric(err.instance):
                    hint = f" (YAML reads {err.instance} as text: write it with a decimal point, e.g. 1.0e-4)"
                lines.append(f"{source}: {key}: {err.message}{hint}")
        raise ConfigError("\n".join(lines))
    return cfg


# YAML 1.1 (PyYAML, and so Snakemake's config files) reads ``1e-4`` as a string; YAML 1.2 and
# people read it as a number. ``--set`` values follow YAML 1.2 here; files keep PyYAML's reading
# so that the stages accept exactly what Snakemake's own validation does.
_FLOAT_12 = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _looks_numeric(text: str) -> bool:
    return bool(_FLOAT_12.match(text.strip()))


def _parse_value(raw: str) -> Any:
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _looks_numeric(value):
        return float(value)
    return value


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``3``, ``1e-4``, ``[1, 2]``, ``null``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = _parse_value(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({exc})") from exc
        node = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``: sections merge key by key, anything else is replaced (as
    Snakemake merges ``--configfile`` overlays)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(
    path: str | Path | Sequence[str | Path] = "config.yaml", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a YAML config (or several: each later file overlays the ones before it, e.g.
    ``config.yaml`` then ``config/quality.yaml``), apply overrides, validate, return the resolved dict."""
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise ConfigError("no config file given")
    raw: dict[str, Any] = {}
    for p in paths:
        raw = _merge(raw, _read_yaml(p))
    raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=" + ".join(map(str, paths)))


def dump_config(cfg: dict[str, Any], path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (written beside each stage's output)."""
    from surrogate.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every stage shares: --config, --set, --log-level."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="PATH",
        help="YAML config file (default: config.yaml); repeat to overlay presets: --config config.yaml "
        "--config config/quality.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def parse_stage_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse argv, set up logging, load and validate the config; config errors exit 2 with one message."""
    args = parser.parse_args(argv)
    args.config = args.config or ["config.yaml"]
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return args, cfg

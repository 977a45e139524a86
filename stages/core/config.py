"""Validation of the workflow configuration against ``workflow/schemas/config.schema.yaml``.

The Snakefile calls :func:`validate_config` once at start-up. A config with an unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError` whose message names the key (as a dotted path) and what is allowed;
missing optional keys are filled with the schema's defaults.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration does not satisfy the schema."""


@functools.cache
def _parsed_schema(path: Path) -> dict[str, Any]:
    """The schema file parsed once per process (the workflow asks for it for every rule and job)."""
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """The config schema (a copy: the caller may change it)."""
    return copy.deepcopy(_parsed_schema(Path(path)))


def fill_defaults(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` where every absent key that has a schema ``default`` gets it (recursively)."""
    out = copy.deepcopy(config)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(out.get(key), dict):
            out[key] = fill_defaults(out[key], sub)
    return out


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The offending key is not in the path; name it explicitly.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(extra[0] if extra else "?")
    elif error.validator == "required":
        parts.append(str(error.message.split("'")[1]))
    return ".".join(parts) if parts else "<top level>"


def _allowed(error: jsonschema.ValidationError) -> str:
    schema = error.schema
    if error.validator == "additionalProperties":
        return "known keys here: " + ", ".join(sorted(schema.get("properties", {})))
    bits = []
    if "type" in schema:
        bits.append(f"type {schema['type']}")
    if "enum" in schema:
        bits.append("one of " + ", ".join(repr(v) for v in schema["enum"]))
    for word, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if word in schema:
            bits.append(f"{sym} {schema[word]}")
    for word in ("minItems", "maxItems", "pattern"):
        if word in schema:
            bits.append(f"{word} {schema[word]}")
    if "description" in schema:
        bits.append(f"({schema['description'].strip().rstrip('.')})")
    return "allowed: " + ", ".join(bits) if bits else ""


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``config`` against the schema and return it with defaults filled in.

    Raises :class:`ConfigError` listing every violation, each as ``key: problem; allowed: ...``.
    """
    schema = load_schema() if schema is None else schema
    filled = fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}; {_allowed(e)}".rstrip("; ") for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    return filled


def section_config(cls: type, section: str, values: dict[str, Any] | None = None) -> Any:
    """Build dataclass ``cls`` from a (partial) config section: validated, defaults filled, lists as tuples."""
    filled = validate_config({section: dict(values or {})})[section]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in filled.items()})


def runtime_keys(section: str, schema: dict[str, Any] | None = None) -> frozenset[str]:
    """The keys of config ``section`` marked ``x-runtime: true`` in the schema: they change how a job runs (threads,
    read-ahead, evaluation batch, checkpoint interval, picture counts), not what it computes, so the rules keep them
    out of their params (workflow/rules/common.smk)."""
    props = (schema or _parsed_schema(SCHEMA_PATH))["properties"][section].get("properties", {})
    return frozenset(k for k, spec in props.items() if spec.get("x-runtime"))

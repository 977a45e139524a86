"""Shared command-line plumbing for the stages: options generated from the config schema, and logging.

A stage that takes a config section (e.g. ``demo``) gets one ``--option`` per key of that section, with the type,
default and help text of the schema, so ``--help`` documents every option and a value out of range fails with the
key's name, exactly as it would in ``config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from stages.core.config import ConfigError, load_schema, validate_config

_TYPES = {"integer": int, "number": float, "string": str}


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"true", "yes", "1"}:
        return True
    if lowered in {"false", "no", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (worker counts, numbers of subjects or scans to show)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def existing_folder(text: str) -> Path:
    """argparse type: a folder that exists (the output folder of an earlier stage)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def existing_file(text: str) -> Path:
    """argparse type: a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return Path(text)


def add_section_options(parser: argparse.ArgumentParser, section: str, prefix: str = "") -> None:
    """Add ``--key`` (``--prefix-key`` with a ``prefix``: a second section beside one without, as a method's own
    section beside ``pretrain``) for every key of config section ``section`` (help, type and default from the
    schema)."""
    props = load_schema()["properties"][section]["properties"]
    group = parser.add_argument_group(f"config section '{section}' (see workflow/schemas/config.schema.yaml)")
    for key, spec in props.items():
        text = f"{spec['description']} (default: {spec.get('default')})".replace("%", "%%")   # argparse formats help
        kwargs: dict[str, Any] = {"dest": _dest(key, prefix), "default": spec.get("default"), "help": text}
        kind = spec["type"]
        if kind == "boolean":
            kwargs.update(type=_boolean, metavar="{true,false}")
        elif kind == "array":
            fixed = spec.get("minItems") is not None and spec.get("minItems") == spec.get("maxItems")
            kwargs.update(type=_TYPES[spec["items"]["type"]],
                          nargs=spec["minItems"] if fixed else ("+" if spec.get("minItems", 0) > 0 else "*"))
            if fixed and spec["minItems"] == 2:
                kwargs["metavar"] = ("MIN", "MAX")
            if "enum" in spec["items"]:
                kwargs["choices"] = spec["items"]["enum"]
        else:
            kwargs.update(type=_TYPES[kind], metavar={"integer": "N", "number": "X", "string": "TEXT"}[kind])
            if "enum" in spec:
                kwargs.update(choices=spec["enum"], metavar=None)
        group.add_argument("--" + (f"{prefix}-" if prefix else "").replace("_", "-") + key.replace("_", "-"), **kwargs)


def _dest(key: str, prefix: str) -> str:
    return f"{prefix}__{key}" if prefix else key


def section_from_args(args: argparse.Namespace, section: str, parser: argparse.ArgumentParser,
                      prefix: str = "") -> dict[str, Any]:
    """The section's values from parsed arguments (options added with ``prefix``), validated against the schema (a
    bad value exits with code 2)."""
    props = load_schema()["properties"][section]["properties"]
    values = {key: getattr(args, _dest(key, prefix)) for key in props}
    try:
        validate_config({section: values})
    except ConfigError as err:
        parser.error(str(err))
    return values


def section_options(values: dict[str, Any], prefix: str = "") -> str:
    """Render a config section back into shell-quoted command-line options (used by the workflow's rules; ``prefix``
    as in :func:`add_section_options`), keys in sorted order: the same settings give the same string however the
    user's config orders them (Snakemake re-runs a job whose params string changes)."""
    parts = []
    for key, value in sorted(values.items()):
        flag = "--" + (f"{prefix}-" if prefix else "").replace("_", "-") + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(f"{flag} {str(value).lower()}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def add_log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", type=Path, default=None,
                        help="Write the log to this file (default: standard error).")


def setup_logging(log: Path | None, name: str) -> logging.Logger:
    """Timestamped logging to ``log`` (the rule's log file) or to standard error."""
    handler: logging.Handler
    if log is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return logging.getLogger(name)


def add_split_tables(parser: argparse.ArgumentParser) -> None:
    """--subjects and --volumes: the splits stage's tables a downstream stage reads."""
    parser.add_argument("--subjects", type=existing_file, required=True,
                        help="subjects.parquet of the splits stage (each subject's parts).")
    parser.add_argument("--volumes", type=existing_file, required=True,
                        help="volumes.parquet of the splits stage (each extracted volume with its labels and parts).")


def add_encoder_size_options(parser: argparse.ArgumentParser, when: str = "") -> None:
    """--width and --embedding-dim: the size of an encoder built from random weights (pretrain.width,
    pretrain.embedding_dim); ``when`` says in which case the stage reads them."""
    parser.add_argument("--width", type=float, default=1.0,
                        help=f"{when}channel width (pretrain.width; default 1).")
    parser.add_argument("--embedding-dim", type=positive_int, default=1024,
                        help=f"{when}FC7 size (pretrain.embedding_dim; default 1024).")


def add_output_options(parser: argparse.ArgumentParser, outputs: dict[str, str], required: bool = True,
                       title: str = "outputs") -> None:
    """``--out-<name> PATH`` for each of ``outputs`` (name -> help text): the files and folders a stage writes, as its
    rule declares them. With ``required`` False, :func:`outputs_from_args` checks them when the stage needs them."""
    group = parser.add_argument_group(title)
    for name, text in outputs.items():
        group.add_argument("--out-" + name.replace("_", "-"), dest="out_" + name, type=Path, default=None,
                           required=required, metavar="PATH", help=text)


def outputs_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                      outputs: dict[str, str]) -> dict[str, Path]:
    """The paths of --out-<name> by name; a missing one exits with code 2, naming it."""
    missing = [name for name in outputs if getattr(args, "out_" + name) is None]
    if missing:
        parser.error(f"--out-{missing[0].replace('_', '-')} is required")
    return {name: getattr(args, "out_" + name) for name in outputs}

"""Pseudonymisation: keyed hashes for identifiers, and scrubbing of identity from free text and paths.

Identifiers leave ingest only as HMAC-SHA256 digests under a secret key, so the same PatientID always maps to the
same subject id for the holder of the key, and nobody without it can test a guess. The key comes from a file named in
the config or from the environment (``SPINE_SSL_PSEUDONYM_KEY``), never from the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

KEY_ENV = "SPINE_SSL_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
REDACTED = "[redacted]"


class PseudonymKeyError(RuntimeError):
    """No usable pseudonymisation key."""


MAX_AGE = 90  # ages above 89 are identifying (HIPAA safe harbour): reported as 90
IDENTITY_COLUMNS = re.compile(r"name|birth|dob|accession|address|phone|mrn|institution|date", re.I)


def load_key(key_file: str | Path | None, environ: dict[str, str] | None = None) -> bytes:
    """The key from ``key_file`` if given, else from the environment; at least 16 bytes after stripping whitespace."""
    environ = os.environ if environ is None else environ
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise PseudonymKeyError(f"pseudonymisation key file {path} does not exist")
        key = path.read_bytes().strip()
        source = f"key file {path}"
    elif environ.get(KEY_ENV):
        key = environ[KEY_ENV].strip().encode()
        source = f"environment variable {KEY_ENV}"
    else:
        raise PseudonymKeyError(f"no pseudonymisation key: name a key file in the config (cohort.key_file) or set {KEY_ENV}")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"the key in {source} has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def write_key(path: Path, key: bytes) -> None:
    """Write ``key`` as a key file :func:`load_key` reads (one line; at least 16 bytes)."""
    if len(key.strip()) < MIN_KEY_BYTES:
        raise PseudonymKeyError(f"a key needs at least {MIN_KEY_BYTES} bytes, got {len(key.strip())}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.strip() + b"\n")


def add_key_option(parser: argparse.ArgumentParser) -> None:
    """--key-file, the pseudonymisation key of every stage that pseudonymises (default: the environment variable)."""
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"File holding the pseudonymisation key (default: environment variable {KEY_ENV}).")


def key_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bytes:
    """The key named by --key-file, else the environment's; exits with code 2 and the reason when there is none."""
    try:
        return load_key(args.key_file)
    except PseudonymKeyError as err:
        parser.error(str(err))


def digest(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """Hex HMAC-SHA256 of ``kind:value`` under ``key``, cut to ``length`` characters."""
    if not value:
        raise ValueError(f"cannot pseudonymise an empty {kind}")
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]


def subject_id(key: bytes, patient_id: str) -> str:
    return "sub-" + digest(key, "patient", patient_id)


def study_id(key: bytes, study_uid: str) -> str:
    return "ses-" + digest(key, "study", study_uid, 12)


def series_id(key: bytes, series_uid: str) -> str:
    return "scan-" + digest(key, "series", series_uid)


def family_id(key: bytes, family: str) -> str:
    return "fam-" + digest(key, "family", family, 12)


def identity_tokens(values: Iterable[str]) -> set[str]:
    """Pieces of identity to look for in text: each value and, for person names, each name component of 3+ letters."""
    tokens: set[str] = set()
    for value in values:
        text = str(value or "").strip()
        if len(text) >= 3:
            tokens.add(text.lower())
        for part in re.split(r"[\^\s,]+", text):
            if len(part) >= 3:
                tokens.add(part.lower())
    return tokens


def scrub(text: str, tokens: set[str]) -> str:
    """``text`` with every occurrence of an identity token (case-insensitive) replaced by [redacted]."""
    out = text
    for token in sorted(tokens, key=len, reverse=True):
        out = re.sub(re.escape(token), REDACTED, out, flags=re.IGNORECASE)
    return out


def scrub_path(relative: str, tokens: set[str]) -> str:
    """A relative path with every component that contains identity replaced by [redacted]."""
    parts = Path(relative).parts
    return "/".join(REDACTED if scrub(p, tokens) != p else p for p in parts)


def safe_name(text: str, max_len: int = 64) -> str:
    """A file-name-safe version of free text: letters, digits, dot, dash and underscore only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned[:max_len] or "unnamed"


def pseudonymise_table(table: pd.DataFrame, key: bytes, what: str) -> pd.DataFrame:
    """Hash the id columns (patient_id, study_uid, family_id), drop identity-like columns, cap ages."""
    if "patient_id" not in table:
        raise ValueError(f"the {what} table needs a patient_id column; it has {list(table.columns)}")
    out = pd.DataFrame({"subject_id": [subject_id(key, str(p)) for p in table["patient_id"]]})
    if "study_uid" in table:
        out["study_id"] = [study_id(key, str(s)) for s in table["study_uid"]]
    if "family_id" in table:   # a blank family is an unknown one, never one family of everyone without one
        out["family_id"] = [family_id(key, str(f).strip()) if pd.notna(f) and str(f).strip() else None
                            for f in table["family_id"]]
    for column in table.columns:
        if column in {"patient_id", "study_uid", "family_id"} or IDENTITY_COLUMNS.search(column):
            continue
        values = table[column]
        if "age" in column.lower() and pd.api.types.is_numeric_dtype(values):
            values = values.clip(upper=MAX_AGE)
        out[column] = values.to_numpy()
    return out

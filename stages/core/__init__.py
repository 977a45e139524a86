"""Shared core: the config (schema, validation, per-stage options), command-line helpers, level names, shards of
scans, seed derivations, the device choice, the shared error types and a module's local imports. Imports nothing
from the other subpackages."""

"""The README stays true as the workflow grows: it names every config key and every rule."""

from __future__ import annotations

import re

from conftest import ROOT

from stages.core.config import load_schema

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _keys(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object":
            yield from _keys(sub, f"{path}{key}.")
        else:
            yield f"{path}{key}"


def test_readme_documents_every_config_key():
    missing = [k for k in _keys(load_schema()) if f"`{k}`" not in README]
    assert not missing, f"README.md does not document {missing}"


def test_readme_lists_every_rule_and_shows_the_rule_graph():
    rules = {m for p in (ROOT / "workflow" / "rules").glob("*.smk")
             for m in re.findall(r"^rule (\w+):", p.read_text(), flags=re.M)}
    assert rules
    missing = [r for r in sorted(rules) if f"`{r}`" not in README]
    assert not missing, f"README.md does not list rules {missing}"
    assert (ROOT / "docs" / "rulegraph.png").is_file() and "docs/rulegraph.png" in README
    assert (ROOT / "docs" / "demo_montage.png").is_file() and "docs/demo_montage.png" in README


def test_readme_opens_with_the_two_commands():
    head = README.split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci

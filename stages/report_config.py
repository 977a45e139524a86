"""Stage report_config: the run's configuration (after validation, every default filled in) as YAML and as an HTML
page for the report, so that a reader sees exactly which settings made the figures.

The configuration given is the one that makes the results: the workflow leaves out the keys that change how a job
runs but not what it computes (``x-runtime`` in workflow/schemas/config.schema.yaml: threads, read-ahead, picture
counts), so that changing them re-runs nothing; the page names them.

Run:
    python -m stages.report_config --config "$(python -c 'import json; print(json.dumps({"seed": 1}))')" \\
        --out results/report/tables/configuration.yaml --html results/report/tables/configuration.html
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

import yaml

from stages.core import cli
from stages.core.config import load_schema, runtime_keys


def left_out(config: dict[str, Any]) -> list[str]:
    """The ``section.key`` names of the schema's ``x-runtime`` keys of the sections in ``config``."""
    schema = load_schema()
    return [f"{section}.{key}" for section in sorted(config) if section in schema["properties"]
            for key in sorted(runtime_keys(section, schema))]


def render(config: dict[str, Any]) -> tuple[str, str]:
    """The configuration as YAML text and as a standalone HTML page (one section per top-level key, and the keys left
    out because they do not change results)."""
    text = yaml.safe_dump(config, sort_keys=True, default_flow_style=None, width=110)
    sections = []
    for key in sorted(config):
        body = yaml.safe_dump({key: config[key]}, sort_keys=True, default_flow_style=None, width=110)
        sections.append(f"<h4>{html.escape(key)}</h4>\n<pre>{html.escape(body)}</pre>")
    runtime = left_out(config)
    note = ("\n<p>Not listed: the settings that change how a job runs but not its results (" + html.escape(
        ", ".join(runtime)) + ").</p>") if runtime else ""
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Configuration</title>\n<style>body "
            "{ font-family: sans-serif; margin: 1.5em; } pre { background: #f6f6f6; padding: 0.6em; "
            "font-size: 0.85em; }</style></head><body>\n<h3>The run's configuration (defaults filled in)</h3>\n"
            + "\n".join(sections) + note + "\n</body></html>\n")
    return text, page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.report_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="The validated configuration as a JSON object, without its "
                                                        "x-runtime keys.")
    parser.add_argument("--out", type=Path, required=True, help="The YAML file to write.")
    parser.add_argument("--html", type=Path, required=True, help="The HTML page to write.")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as error:
        parser.error(f"--config is not valid JSON: {error}")
    if not isinstance(config, dict):
        parser.error(f"--config must be a JSON object, got {type(config).__name__}")
    text, page = render(config)
    for path, content in ((args.out, text), (args.html, page)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

from __future__ import annotations

import importlib
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, out_args

from stages.core.cli import section_options
from stages.core.config import ConfigError, fill_defaults, load_schema, validate_config
from stages.demo_cohort import DemoOutputs, build_parser


def _load(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_shipped_configs_are_valid():
    for path in [ROOT / "config.yaml", *sorted((ROOT / "tests" / "configs").glob("*.yaml"))]:
        validate_config(_load(path))


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section, as Snakemake merges --configfile files."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.mark.parametrize("paper", sorted(p.name for p in (ROOT / "config" / "paper").glob("*.yaml")))
def test_paper_configs_are_valid_on_top_of_config_yaml(paper):
    over = _load(ROOT / "config" / "paper" / paper)
    config = validate_config(_merged(_load(ROOT / "config.yaml"), over))
    assert config["cohort"] == validate_config(_load(ROOT / "config.yaml"))["cohort"]   # the cohort is the user's
    assert "cohort" not in over and "demo" not in over and "results" not in over
    if config["reports"]["gradcam_task"] not in config["probes"]["tasks"]:
        pytest.fail(f"{paper}: reports.gradcam_task is not among probes.tasks")


@pytest.mark.parametrize("extra", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_the_demo_s_other_configs_are_valid_on_top_of_config_yaml(extra):
    over = _load(ROOT / "config" / extra)
    validate_config(_merged(_load(ROOT / "config.yaml"), over))
    assert "cohort" not in over and "results" not in over


def test_empty_config_gets_every_default():
    filled = validate_config({})
    schema = load_schema()
    assert filled["results"] == "results"
    assert set(filled["demo"]) == set(schema["properties"]["demo"]["properties"])
    assert filled["demo"]["n_subjects"] == schema["properties"]["demo"]["properties"]["n_subjects"]["default"]


def test_config_yaml_spells_out_every_default_key():
    """config.yaml is the user's map of the workflow: it names every key the schema has."""
    shipped = _load(ROOT / "config.yaml")
    assert fill_defaults(shipped, load_schema()).keys() == shipped.keys()
    assert set(shipped["demo"]) == set(load_schema()["properties"]["demo"]["properties"])


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _walk(sub, f"{path}{key}.")


def test_every_schema_key_is_described_and_has_a_default():
    for key, sub in _walk(load_schema()):
        assert sub.get("description", "").strip(), f"{key} has no description"
        assert "default" in sub, f"{key} has no default"
    assert load_schema()["additionalProperties"] is False


@pytest.mark.parametrize(("config", "key", "words"), [
    ({"demo": {"matrixx": 64}}, "demo.matrixx", "known keys here"),
    ({"bogus": 1}, "bogus", "known keys here"),
    ({"demo": {"n_subjects": 1}}, "demo.n_subjects", "minimum of 2"),
    ({"demo": {"twin_fraction": "half"}}, "demo.twin_fraction", "not of type 'number'"),
    ({"demo": {"followup_years": [8]}}, "demo.followup_years", "minItems 2"),
    ({"cohort": {"source": "pacs"}}, "cohort.source", "'demo'"),
])
def test_bad_config_names_the_key_and_what_is_allowed(config, key, words):
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    message = str(err.value)
    assert f"  {key}:" in message
    assert words in message


def test_section_options_round_trip_through_the_stage_cli():
    values = validate_config({"demo": {"n_subjects": 5, "bad_files": False, "followup_years": [7.5, 9]}})["demo"]
    outputs = out_args(DemoOutputs.in_folder(Path("x")))
    args = build_parser().parse_args([*outputs, *shlex.split(section_options(values))])
    assert {k: getattr(args, k) for k in values} == values


def test_stage_cli_rejects_out_of_range_value_naming_it():
    run = subprocess.run([sys.executable, "-m", "stages.demo_cohort", *out_args(DemoOutputs.in_folder(Path("unused"))),
                          "--n-subjects", "1"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "demo.n_subjects" in run.stderr and "minimum of 2" in run.stderr


@pytest.mark.parametrize("module", ["demo_cohort", "demo_montage"])
def test_stage_help_explains_every_option(module):
    run = subprocess.run([sys.executable, "-m", f"stages.{module}", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0
    assert "usage: python -m stages." + module in run.stdout
    assert "--out" in run.stdout and "--log" in run.stdout
    if module == "demo_cohort":
        for key in load_schema()["properties"]["demo"]["properties"]:
            assert "--" + key.replace("_", "-") in run.stdout


STAGE_SECTIONS = {"demo_cohort": "demo", "ingest": "ingest", "localiser_train": "localise", "localise": "localise",
                  "extract": "extract", "splits": "splits", "pretrain": "pretrain", "demo_montage": None,
                  "ingest_volumes": None, "extract_qc": None, "pretext_eval": None, "features": None,
                  "supervised": "probe_training", "probe": "probe_training", "probe_summary": "probes",
                  "disc_masks": None, "gradcam": None, "embeddings": None, "figures": None, "report_config": None,
                  "ingest_crops": None, "extract_crops": "extract", "genetics": "genetics", "ingest_genotypes": None,
                  "population": "population"}


@pytest.mark.parametrize("module", sorted(STAGE_SECTIONS))
def test_every_stage_cli_has_a_help_text_naming_its_config_section_keys(module):
    stage = importlib.import_module(f"stages.{module}")
    text = stage.build_parser().format_help()      # a '%' in a schema description once broke --help
    assert "usage: python -m stages." + module in text
    section = STAGE_SECTIONS[module]
    if section:
        missing = [k for k in load_schema()["properties"][section]["properties"]
                   if "--" + k.replace("_", "-") not in text]
        assert not missing, missing


def test_stage_cli_rejects_unknown_argument():
    tables = [arg for name in ("studies", "gradings", "landmarks") for arg in (f"--{name}", "pyproject.toml")]
    run = subprocess.run([sys.executable, "-m", "stages.demo_montage", "--dicom", ".", *tables, "--out", "y.png",
                          "--colour"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "unrecognized arguments: --colour" in run.stderr

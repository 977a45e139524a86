"""pyproject.toml declares the dependencies once; the conda environment for `--sdm conda` names the same packages."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import ROOT

CONDA_TO_PYPI = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_conda_env_names_the_same_packages_as_pyproject():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        pyproject = {_name(r) for r in tomllib.load(handle)["project"]["dependencies"]}
    conda_files = sorted((ROOT / "envs").glob("*.yaml"))
    assert conda_files, "envs/ holds no conda environment file"
    for path in conda_files:
        with open(path, encoding="utf-8") as handle:
            deps = yaml.safe_load(handle)["dependencies"]
        names = {CONDA_TO_PYPI.get(_name(d), _name(d)) for d in deps if isinstance(d, str)} - {"python"}
        assert names == pyproject, f"{path.name}: only in conda {names - pyproject}, only in pyproject {pyproject - names}"


def test_no_torchvision_anywhere():
    text = (ROOT / "pyproject.toml").read_text() + "".join(p.read_text() for p in (ROOT / "envs").glob("*.yaml"))
    assert "torchvision" not in text

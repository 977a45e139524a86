"""The rule files read cleanly: Snakemake's linter has nothing to say about them and snakefmt leaves them as they
are (both run here, so CI keeps them so)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

BIN = Path(sys.executable).parent
RULE_FILES = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]


def test_snakemake_lint_reports_nothing(tmp_path):
    for config in (ROOT / "tests" / "configs" / "tiny.yaml", ROOT / "config.yaml"):
        run = subprocess.run([str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                              "--lint", "--configfile", str(config)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
        text = run.stdout + run.stderr
        assert run.returncode == 0 and "Lints for" not in text, text[-5000:]


def test_snakefmt_leaves_every_rule_file_as_it_is():
    run = subprocess.run([str(BIN / "snakefmt"), "--check", *map(str, RULE_FILES)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

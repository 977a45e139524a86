"""The package layout: stages at the top, the library in subpackages by concern, imports only downwards, no stage
importing another, and the code inputs of the rules read from the source (stages/core/imports.py)."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

from stages.core.imports import direct_imports, local_imports

STAGES = ROOT / "stages"
# What each subpackage may import from (itself included): the layers of stages/__init__.py.
ALLOWED = {
    "core": {"core"},
    "anatomy": {"core", "anatomy"},
    "demo": {"core", "demo"},
    "nets": {"core", "nets"},
    "archive": {"core", "anatomy", "archive"},
    "training": {"core", "nets", "training"},
    "evaluation": {"core", "nets", "evaluation"},
}


def _modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in STAGES.rglob("*.py")
                  if p.name != "__init__.py")


def _is_stage(module: str) -> bool:
    return module.count(".") == 1


def test_every_subpackage_is_a_known_layer_with_a_docstring():
    packages = {p.name for p in STAGES.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)
    for name in packages:
        doc = ast.get_docstring(ast.parse((STAGES / name / "__init__.py").read_text()))
        assert doc and len(doc) > 40, name


def test_every_stage_is_a_command_line_program():
    stages = [m for m in _modules() if _is_stage(m)]
    assert len(stages) >= 20
    for module in stages:
        source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
        assert 'if __name__ == "__main__":' in source and "def main(" in source, module


@pytest.mark.parametrize("module", _modules())
def test_imports_go_only_downwards_and_no_stage_imports_another(module):
    imported = direct_imports(ROOT, module)
    if _is_stage(module):
        assert not [m for m in imported if _is_stage(m)], f"{module} imports a stage: move the shared code down"
        return
    layer = module.split(".")[1]
    upward = sorted(m for m in imported if _is_stage(m) or m.split(".")[1] not in ALLOWED[layer])
    assert not upward, f"{module} ({layer}) imports {upward}; it may import from {sorted(ALLOWED[layer])}"


def test_local_imports_follow_imports_transitively(tmp_path):
    for name, text in {"a": "from stages.pkg import b\n", "pkg/b": "def f():\n    import stages.pkg.c\n",
                       "pkg/c": "from stages.pkg import b  # a cycle\nimport numpy\n", "pkg/d": ""}.items():
        path = tmp_path / "stages" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert local_imports(tmp_path, "a") == ["stages/a.py", "stages/pkg/b.py", "stages/pkg/c.py"]
    assert local_imports(tmp_path, "stages.pkg.d") == ["stages/pkg/d.py"]
    with pytest.raises(ValueError, match="no module stages.nothing"):
        local_imports(tmp_path, "nothing")


def test_one_leakage_error_and_one_device_choice():
    defined = {}
    for path in STAGES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in ("LeakageError", "select_device"):
                defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert defined["LeakageError"] == ["stages/core/errors.py"]
    assert "stages/core/runtime.py" in defined["select_device"]

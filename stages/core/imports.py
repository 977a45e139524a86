"""The local imports of a stage module, transitively: the source files a rule lists as its ``code`` input, so that a
change in any helper a stage runs re-runs the rules that run it (workflow/rules/common.smk, ``code()``).

Read from the source with :mod:`ast` (nothing is imported): every ``import stages.x`` and ``from stages.x import y``,
at module level or inside a function, where ``y`` is a submodule when ``stages/x/y.py`` exists. The packages'
``__init__.py`` files hold docstrings only and are left out.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "stages"


def module_file(root: Path, module: str) -> Path | None:
    """``stages/a/b.py`` for ``stages.a.b`` under ``root``; None for a package or a module outside the tree."""
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    return path if path.is_file() else None


@cache
def direct_imports(root: Path, module: str) -> frozenset[str]:
    """The ``stages`` modules that ``module``'s source imports (module level and inside functions); each source is
    read once per process."""
    path = module_file(root, module)
    if path is None:
        raise ValueError(f"no module {module} under {root} (expected {root.joinpath(*module.split('.'))}.py)")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == PACKAGE and module_file(root, n) is not None)
    found.discard(module)
    return frozenset(found)


@cache
def _closure(root: Path, module: str) -> frozenset[str]:
    seen = {module}
    todo = [module]
    while todo:
        for name in direct_imports(root, todo.pop()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return frozenset(seen)


def local_imports(root: str | Path, stage: str) -> list[str]:
    """The source files (relative to ``root``, sorted) of ``stages.<stage>`` and every ``stages`` module it imports,
    transitively. ``stage`` is a stage name (``pretrain``) or a dotted module (``stages.nets.siamese``)."""
    module = stage if stage.startswith(f"{PACKAGE}.") else f"{PACKAGE}.{stage}"
    root = Path(root).resolve()
    return sorted(str(module_file(root, m).relative_to(root)) for m in _closure(root, module))

"""The package's layers, read from the imports (``ast``: every import statement, at any depth, is counted).

core -> maths -> report/ and study/ -> callbacks/ -> the study runner -> cli and demo/: a module imports only
from its own layer or the ones below, and only the callbacks, the study runner and the demo import Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_scaling"

#: Layer of each module (by dotted name or package prefix); a module imports from layers <= its own.
LAYERS: dict[str, int] = {
    "lightning_scaling": 0, "lightning_scaling._version": 0, "lightning_scaling.warnings": 0,
    "lightning_scaling.numerics": 0, "lightning_scaling.history": 0, "lightning_scaling.laws": 0,
    "lightning_scaling.fitting": 1, "lightning_scaling.forecast": 1, "lightning_scaling.gns": 1,
    "lightning_scaling.backtest": 1, "lightning_scaling.stopping": 1, "lightning_scaling.recorder": 0,
    "lightning_scaling.report": 2, "lightning_scaling.study": 2, "lightning_scaling.refit": 2,
    "lightning_scaling.callbacks": 3,
    "lightning_scaling.study.run": 4, "lightning_scaling.study.ray_backend": 4,
    "lightning_scaling.cli": 5, "lightning_scaling.demo": 5,
}
#: Modules allowed to import Lightning (the adapters and what trains).
LIGHTNING_OK = ("lightning_scaling.callbacks", "lightning_scaling.study.run", "lightning_scaling.demo")


def _layer(module: str) -> int:
    """Layer of ``module``: its own entry, else its longest package prefix's."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one.
            out += [(node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base) for a in node.names]
    return out


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer() -> None:
    assert len(_sources()) > 20
    for path in _sources():
        _layer(_module_name(path))  # raises for a module nobody placed


def test_no_module_imports_from_a_higher_layer() -> None:
    wrong = []
    for path in _sources():
        me = _module_name(path)
        for line, target in _imports(path):
            if target.split(".")[0] == "lightning_scaling" and _layer(target) > _layer(me):
                wrong.append(f"{me}:{line} imports {target} (layer {_layer(target)} > {_layer(me)})")
    assert not wrong, "\n".join(wrong)


def test_only_callbacks_runner_and_demo_import_lightning() -> None:
    wrong = []
    for path in _sources():
        me = _module_name(path)
        allowed = any(me == ok or me.startswith(ok + ".") for ok in LIGHTNING_OK)
        for line, target in _imports(path):
            if target.split(".")[0] in ("lightning", "pytorch_lightning") and not allowed:
                wrong.append(f"{me}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, importer, ok", [
    ("from lightning_scaling.callbacks import LossTrajectory\n", "lightning_scaling/fitting.py", False),
    ("from lightning_scaling.history import RunHistory\n", "lightning_scaling/report/figures.py", True),
    ("from . import tables\n", "lightning_scaling/report/figures.py", True),
    ("from ..study import run\n", "lightning_scaling/report/figures.py", False),
])
def test_the_check_sees_absolute_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      source: str, importer: str, ok: bool) -> None:
    # The same reading on a planted file: a violation the test must catch, and a harmless import it must not.
    target = PACKAGE.parent / importer
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == target else "")
    me = _module_name(target)
    found = [t for _, t in _imports(target) if t.startswith("lightning_scaling") and _layer(t) > _layer(me)]
    assert (not found) is ok, found

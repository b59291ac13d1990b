"""The layering of DESIGN.md §3, checked on the source: imports run one way, no cycle.

Every `import` / `from ... import` in fastdiff/ and kernels/ counts, including those inside
functions, so a cycle cannot hide behind a lazy import.
"""

import ast
import sys
from pathlib import Path

import fastdiff

ROOT = Path(__file__).resolve().parent.parent

# lower number = lower layer; a module may import its own layer or any lower one
LAYERS = {"kernels": 0, "engine": 1, "training": 2, "methods": 3, "eval": 4,
          "integrations": 4, "apps": 5}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "fastdiff").rglob("*.py")):
        rel = path.relative_to(ROOT / "fastdiff").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        found[".".join(["fastdiff", *parts])] = path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT / "kernels").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        found[".".join(["fastdiff", "kernels", *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastdiff modules `name` imports (resolved to the deepest known module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("fastdiff") and t != name:
                out.add(t)
    return out


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if name == "fastdiff.__main__":  # `python -m fastdiff`: the CLI, so an app
        return LAYERS["apps"]
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _graph():
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_runs_up_a_layer():
    bad = []
    for src, targets in _graph().items():
        for dst in targets:
            if src == "fastdiff" or dst == "fastdiff":
                if dst == "fastdiff":
                    bad.append(f"{src} imports the top-level package")
                continue
            a, b = _layer(src), _layer(dst)
            assert a is not None, f"{src} is in no layer: add its folder to LAYERS"
            if b > a:
                bad.append(f"{src} (layer {a}) imports {dst} (layer {b})")
    assert not bad, "imports that run up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    bad = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in allowed]
    assert not bad, bad


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    # the same walk over a fake tree must flag what it is meant to flag
    fake = tmp_path / "fastdiff"
    (fake / "engine").mkdir(parents=True)
    (fake / "methods").mkdir()
    (tmp_path / "kernels").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "methods" / "__init__.py").write_text("")
    (fake / "engine" / "a.py").write_text("def f():\n    from fastdiff.methods import b\n")
    (fake / "methods" / "b.py").write_text("from fastdiff.engine import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    import pytest

    with pytest.raises(AssertionError, match="runs up a layer|imports that run up"):
        test_no_import_runs_up_a_layer()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()


def test_public_api_is_importable_from_fastdiff():
    for name in fastdiff.__all__:
        assert getattr(fastdiff, name) is not None, name

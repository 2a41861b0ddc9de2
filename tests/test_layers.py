"""The package's layering, walked from the source: no module imports from a layer above its own,
the runtime imports nothing of export, heads, calibration, bench, models or the CLI, and module-level
imports form no cycle. Layers (lowest first) are written down in README's "Architecture" section."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "edgeclip"
RANK = {"errors": 0, "_lazy": 0, "_files": 0, "specs": 1, "builtin": 1, "runtime": 2, "models": 3, "kernels": 3,
        "onnxgraph": 3, "calibration": 4, "heads": 5, "exporter": 5, "__init__": 6, "bench": 7, "cli": 8, "__main__": 9}
RUNTIME_MAY_NOT = {"exporter", "heads", "calibration", "bench", "models", "cli"}


def _modname(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, top_level_only: bool):
    """(line, imported edgeclip module) of every import in `path` (or only its module-level ones)."""
    me = _modname(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("edgeclip"))
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if not mod.startswith("edgeclip"):
                continue
            yield node.lineno, mod
            for a in node.names:  # `from . import x` imports the submodule x
                if (SRC.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").is_file() or \
                        (SRC.parent / (mod + "." + a.name).replace(".", "/") / "__init__.py").is_file():
                    yield node.lineno, f"{mod}.{a.name}"


def _files():
    return sorted(SRC.rglob("*.py"))


def test_every_layer_is_ranked():
    assert {_layer(_modname(f)) for f in _files()} <= set(RANK)


def test_no_module_imports_from_a_layer_above():
    up = []
    for f in _files():
        me = _modname(f)
        for line, mod in _imports(f, top_level_only=False):
            a, b = _layer(me), _layer(mod)
            if a != b and (RANK[b] > RANK[a] or (a == "runtime" and b in RUNTIME_MAY_NOT)):
                up.append(f"{me} -> {mod} (line {line})")
    assert up == []


def test_module_level_imports_form_no_cycle():
    graph = {_modname(f): {m for _, m in _imports(f, top_level_only=True)} for f in _files()}
    for mod, deps in graph.items():  # importing a.b.c first imports its packages a.b and a
        graph[mod] = {p for d in deps for p in (".".join(d.split(".")[:i]) for i in range(2, d.count(".") + 2))
                      if p in graph and p != mod and not mod.startswith(p + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_import_edgeclip_loads_no_heavy_library():
    import subprocess
    import sys

    code = "import edgeclip, sys; print([m for m in ('PIL', 'onnx', 'torch', 'onnxruntime') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

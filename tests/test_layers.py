"""The package's imports form one-way layers (read from the source, nothing is imported).

calibrate -> score book -> allocate (ToD) -> plan -> surgery: allocation (plan, tod, scorebook,
cost) imports nothing from the adapters; no module imports another module's private names; no
import cycle, function-level imports included. docs/imports.md shows the same graph.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "fair_pruner")
EXTENSIONS = {"fair_pruner._C", "fair_pruner._cuda"}          # compiled, not Python files
ALLOCATION = ("fair_pruner.plan", "fair_pruner.tod", "fair_pruner.scorebook", "fair_pruner.cost",
              "fair_pruner.errors", "fair_pruner.signals")
ADAPTER_MODULES = ("fair_pruner.calibrate", "fair_pruner.graph", "fair_pruner.surgery",
                   "fair_pruner.engine", "fair_pruner.adapters", "fair_pruner.llm")


def _modules():
    mods = {}
    for dp, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), os.path.join(ROOT, ".."))
                name = rel[:-3].replace(os.sep, ".")
                mods[name[:-9] if name.endswith(".__init__") else name] = os.path.join(dp, f)
    return mods


def import_graph():
    """{module: {imported fair_pruner module}}, and the (importer, module, name) private imports."""
    mods = _modules()
    edges, private = {}, []
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("fair_pruner"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    dest = sub if sub in mods or sub in EXTENSIONS else target
                    edges.setdefault(m, set()).add(dest)
                    if a.name.startswith("_") and dest == target and target != m:
                        private.append((m, target, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("fair_pruner"):
                        edges.setdefault(m, set()).add(a.name)
    return mods, edges, private


def _cycles(mods, edges):
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if v not in mods:
                continue
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2
    for u in sorted(mods):
        if not state.get(u):
            visit(u)
    return found


def test_no_import_cycle():
    mods, edges, _ = import_graph()
    assert _cycles(mods, edges) == []


def test_no_private_cross_module_import():
    assert import_graph()[2] == []


@pytest.mark.parametrize("module", ALLOCATION)
def test_allocation_imports_nothing_from_the_adapters(module):
    _, edges, _ = import_graph()
    seen, todo = set(), [module]
    while todo:                       # everything reachable from the allocation layer
        m = todo.pop()
        for d in edges.get(m, ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    bad = sorted(d for d in seen if d.startswith(ADAPTER_MODULES))
    assert bad == [], f"{module} reaches {bad}"


def mermaid() -> str:
    mods, edges, _ = import_graph()
    lines = ["```mermaid", "graph TD"]
    for m in sorted(edges):
        for d in sorted(edges[m]):
            if d in mods and d != m and m != "fair_pruner":
                lines.append(f"  {m.replace('fair_pruner', 'fp')} --> "
                             f"{d.replace('fair_pruner', 'fp')}")
    return "\n".join(lines + ["```"])


def test_docs_picture_is_current():
    path = os.path.join(ROOT, "..", "docs", "imports.md")
    text = open(path).read()
    assert mermaid() in text, ("docs/imports.md is stale: regenerate it with "
                               "python -c 'import sys; sys.path.insert(0, \"tests\"); "
                               "import test_layers; print(test_layers.mermaid())'")

"""The shape of the package: module sizes, import direction and no import cycles.

* No module of the package is over 500 lines.
* The library (everything outside ``fedjax_sim/experiment/``) never imports the
  experiment layer; the package face reaches it only lazily (PEP 562), and the
  ``python -m fedjax_sim`` entry point is the command line itself.
* The graph of imports between the package's modules has no cycle.
* SciPy's slow subpackages are imported inside the functions that use them.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fedjax_sim"
ENTRY_POINTS = {"fedjax_sim.__main__"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


MODULES = dict(_modules())


def _imports(name, path):
    """The package modules ``name`` imports at module level (functions included: an
    import inside a function is still an edge of the design)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{a.name}" for a in node.names]
            # ``from package import submodule`` imports the submodule; the package itself
            # counts only when a name taken from it is not a submodule.
            targets = subs + ([module] if any(s not in MODULES for s in subs) else [])
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_module_is_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > 500} == {}


def test_the_library_never_imports_the_experiment_layer():
    library = [n for n in GRAPH if not n.startswith("fedjax_sim.experiment")
               and n not in ENTRY_POINTS]
    offenders = {n: sorted(d for d in GRAPH[n] if d.startswith("fedjax_sim.experiment"))
                 for n in library}
    assert {n: d for n, d in offenders.items() if d} == {}


def test_no_import_cycle():
    # A package imports its own submodules (its face); a submodule importing its package
    # back is the cycle we look for. Edges from a package to its submodules are kept.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == []


SLOW_IMPORTS = ("scipy.stats", "scipy.optimize")
"""Each takes 0.5-1.5 s to import on the benchmark machine: every run, script and
subprocess would pay it at start. Modules import them inside the functions that use them."""


def test_slow_libraries_are_imported_where_they_are_used():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offenders += [f"{name}: {m}" for m in mods if m.startswith(SLOW_IMPORTS)]
    assert offenders == []

"""The notebooks share one install cell, and the notebooks and scripts use the package face.

* Every notebook's first code cell is the same install cell: it installs fedjax_sim from
  the repository that pyproject.toml declares (``[project.urls] Repository``), and only when
  ``fedjax_sim`` is not importable, so the notebooks run unchanged in CI and in Colab.
* ``scripts/*.py`` and the notebooks' code cells import fedjax_sim only as the curated
  package face (``import fedjax_sim`` or ``import fedjax_sim as fs``): never
  ``from fedjax_sim... import`` nor ``import fedjax_sim.<module>``.

Static checks only (no notebook is executed here).
"""

import ast
import pathlib
import re
import sys
import tomllib

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
PIP_LINE = re.compile(r'^\s*%pip install -q "(?P<requirement>fedjax-sim\[notebooks\] @ '
                      r'git\+(?P<url>[^"\s]+))"\s*$', re.MULTILINE)


def _code_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_there_are_notebooks_and_scripts_to_check():
    assert len(NOTEBOOKS) >= 4 and len(SCRIPTS) >= 8


def test_every_notebook_starts_with_the_same_install_cell_from_the_declared_repository():
    first = {path.name: _code_cells(path)[0] for path in NOTEBOOKS}
    cell = first[NOTEBOOKS[0].name]
    assert all(source == cell for source in first.values()), {
        name: source for name, source in first.items() if source != cell}

    # It installs only when fedjax_sim is not importable ...
    assert re.search(r"^try:\n    import fedjax_sim\b.*\nexcept ImportError:\n", cell,
                     re.MULTILINE), cell
    # ... the package of pyproject.toml, with the notebooks' extra, from its repository.
    (pip,) = PIP_LINE.finditer(cell)
    project = _pyproject()
    assert project["name"] == "fedjax-sim"
    assert "notebooks" in project["optional-dependencies"]
    assert pip["url"] == project["urls"]["Repository"] == project["urls"]["Homepage"]
    assert pip["url"].startswith("https://github.com/")


class _Shell:
    """Records the line magics an executed cell asks for."""

    def __init__(self):
        self.magics = []

    def run_line_magic(self, name, line, *args, **kwargs):
        self.magics.append((name, line))


@pytest.mark.parametrize("importable", [True, False])
def test_the_install_cell_installs_only_when_fedjax_sim_is_missing(importable, monkeypatch):
    cell = _code_cells(NOTEBOOKS[0])[0]
    code = TransformerManager().transform_cell(cell)  # %pip -> get_ipython().run_line_magic
    if not importable:
        monkeypatch.setitem(sys.modules, "fedjax_sim", None)  # import raises ImportError
    shell = _Shell()
    exec(compile(code, "install_cell", "exec"), {"get_ipython": lambda: shell})
    if importable:
        assert shell.magics == []
    else:
        (name, line), = shell.magics
        assert name == "pip"
        assert line == f'install -q "{PIP_LINE.search(cell)["requirement"]}"'


def _face_violations(source: str) -> list[str]:
    """Every way ``source`` imports fedjax_sim other than ``import fedjax_sim [as fs]``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "fedjax_sim":
                    continue
                if alias.name != "fedjax_sim" or alias.asname not in (None, "fs"):
                    bad.append(f"line {node.lineno}: import {alias.name}"
                               + (f" as {alias.asname}" if alias.asname else ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == "fedjax_sim":
                bad.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            arg = node.args[0] if node.args else None
            if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and str(arg.value).startswith("fedjax_sim")):
                bad.append(f"line {node.lineno}: {name}({arg.value!r})")
    return bad


def test_the_face_check_sees_deep_imports():
    assert _face_violations("import fedjax_sim as fs\nimport fedjax_sim\nimport jax") == []
    assert len(_face_violations(
        "from fedjax_sim.rounds import make_round\nimport fedjax_sim.poisoning as P\n"
        "from fedjax_sim import server\nimport fedjax_sim as sim\n"
        "def f():\n    import fedjax_sim.attacks.lab\n"
        "importlib.import_module('fedjax_sim.experiment.server')")) == 6


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_import_only_the_package_face(path):
    assert _face_violations(path.read_text()) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_import_only_the_package_face(path):
    transform = TransformerManager().transform_cell  # IPython magics -> plain Python
    bad = {i: v for i, cell in enumerate(_code_cells(path))
           if (v := _face_violations(transform(cell)))}
    assert bad == {}

"""The notebooks are committed without outputs (and there are at least three).

They are executed, top to bottom in a fresh kernel, by the docs build
(tests/test_docs_site.py: myst-nb runs every notebook, and a failing cell fails that test with
the cell's traceback), so they are not executed a second time here.
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_at_least_three_notebooks():
  assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"

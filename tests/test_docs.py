"""The README's Python blocks and every docstring example in jaxmem run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import jaxmem

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules():
  names = ["jaxmem"]
  for info in pkgutil.walk_packages(jaxmem.__path__, "jaxmem."):
    if info.name == "jaxmem._native._qmatmul":  # the native kernel library, loaded by ctypes
      continue
    names.append(info.name)
  return sorted(names)


def test_readme_python_blocks_run():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python block"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_readme_test_command_is_ci():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
  test_commands = [b for b in blocks if '".[test]"' in b]
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert len(test_commands) == 1, "README.md should have one test command"
  assert test_commands[0] in ci, ".ci/run must run the README's test command as one line"

"""What a user's tooling sees: a license, a changelog, and types (py.typed) that mypy reads."""

import os
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_FILE = """\
import jax.numpy as jnp
import jaxmem

params = {"kernel": jnp.ones((8, 4))}
q = jaxmem.transform(jaxmem.quantize_int8(), params)
n: int = jaxmem.tree_bytes(q)
"""


def test_license_and_changelog():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
  license_text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert changelog.startswith("# Changelog") and pyproject["project"]["version"] in changelog


def test_py_typed_is_shipped():
  assert (ROOT / "jaxmem" / "py.typed").is_file()
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["jaxmem"]


def _mypy(tmp_path, source, cache):
  """mypy on a user file, jaxmem found the way an installed package is (PEP 561)."""
  tmp_path.mkdir()
  site = tmp_path / "site"
  site.mkdir()
  (site / "jaxmem").symlink_to(ROOT / "jaxmem", target_is_directory=True)
  user = tmp_path / "user.py"
  user.write_text(source)
  env = {**os.environ, "PYTHONPATH": str(site)}
  return subprocess.run(
      [sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-error-summary", str(user)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_mypy_reads_jaxmem_types(tmp_path):
  ok = _mypy(tmp_path / "ok", USER_FILE, tmp_path / "cache")
  assert ok.returncode == 0, ok.stdout + ok.stderr
  # The types are really read: a wrong annotation on jaxmem's result is an error.
  wrong = _mypy(tmp_path / "wrong", USER_FILE.replace("n: int", "n: str"),
                tmp_path / "cache")
  assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout, (
      wrong.stdout + wrong.stderr)

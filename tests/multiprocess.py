"""Runs a test's worker script as 2 local processes on loopback (jax.distributed) and returns
its shared helper module, for the multi-process tests."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(tmp_path, worker: str, common: str, *, name: str, timeout: float = 150):
  """Writes ``worker.py`` and ``common.py`` to ``tmp_path``, runs ``worker.py PORT I OUTDIR``
  for ``I`` in 0, 1 (without the test's simulated-device flags), fails the test on a timeout or
  a non-zero exit (with the log), and returns ``common.py`` imported as module ``name``."""
  (tmp_path / "worker.py").write_text(worker)
  (tmp_path / "common.py").write_text(common)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [
      subprocess.Popen(
          [sys.executable, str(tmp_path / "worker.py"), str(port), str(i), str(tmp_path / f"{i}")],
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
      )
      for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      logs.append(out)
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"{name}: multi-process run timed out after {timeout} s:\n" + "\n".join(logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  spec = importlib.util.spec_from_file_location(name, tmp_path / "common.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

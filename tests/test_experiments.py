"""The experiments: their one-step train_test files, and kill-and-resume of a real run.

``experiments/*/train_test.py`` live next to the code they test (flax-examples layout);
pytest only collects ``tests/``, so their test functions are collected from here.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_digits = _load("digits_train_test", ROOT / "experiments" / "digits" / "train_test.py")
for _name in dir(_digits):
  if _name.startswith("test_"):
    globals()[f"test_digits_{_name[5:]}"] = getattr(_digits, _name)

_minilm_path = ROOT / "experiments" / "minilm" / "train_test.py"
if _minilm_path.exists():
  _minilm = _load("minilm_train_test", _minilm_path)
  for _name in dir(_minilm):
    if _name.startswith("test_"):
      globals()[f"test_minilm_{_name[5:]}"] = getattr(_minilm, _name)


# ----------------------------------------------------------------------------- workdir module

from jaxmem.models import _workdir as wd  # noqa: E402  (the experiments' bookkeeping)


def test_workdir_paths_keep_cloud_urls():
  """``gs://bucket/x`` stays a URL through the path helper (pathlib makes it ``gs:/bucket/x``)."""
  p = wd.as_path("gs://bucket/x")
  assert os.fspath(p / "checkpoints") == "gs://bucket/x/checkpoints"
  assert os.fspath(p / "tensorboard") == "gs://bucket/x/tensorboard"
  assert str(p / wd.CONFIG_FILE) == "gs://bucket/x/config.json"
  assert str(pathlib.Path("gs://bucket/x")) == "gs:/bucket/x"  # what the helper avoids
  local = wd.as_path(ROOT)
  assert os.fspath(local / "experiments") == os.fspath(ROOT / "experiments")


def test_config_diff_names_changed_fields_with_dotted_paths():
  old = {"seed": 0, "prune": {"final_sparsity": 0.95, "scope": "global"}, "recipes": ["a"],
         "log_every": 5}
  new = {"seed": 0, "prune": {"final_sparsity": 0.5, "scope": "global"}, "recipes": ["a", "b"],
         "log_every": 1, "extra": True}
  assert wd.config_diff(old, new, ignore=("log_every",)) == [
      "extra: <absent> -> true",
      "prune.final_sparsity: 0.95 -> 0.5",
      'recipes: ["a"] -> ["a", "b"]',
  ]
  assert wd.config_diff(old, new, ignore=("prune", "recipes", "extra", "log_every")) == []


# ----------------------------------------------------------------------------- kill and resume

_OVERRIDES = [
    "--config=experiments/digits/configs/default.py",
    "--config.dense_steps=40",
    "--config.prune_steps=40",
    "--config.finetune_steps=40",
    "--config.prune.update_every=5",
    "--config.checkpoint_every=10",
    "--config.log_every=10",
    "--config.eval_every=20",
    "--config.recipes=('dense_fp32','pruned_int8')",
    "--config.progress_bar=False",
]


def _cmd(workdir):
  return [sys.executable, "experiments/digits/main.py", f"--workdir={workdir}", *_OVERRIDES]


def _steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_main_refuses_a_bad_config_with_the_message_alone(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = _cmd(tmp_path / "w") + ["--config.recipes=('dense_fp32','dense_int3')"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "error: invalid digits config" in out.stderr and "'dense_int3'" in out.stderr
  assert "pruned_int4" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()


def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted reference runs alongside the run we kill.
  ref = subprocess.Popen(_cmd(full), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    victim = subprocess.Popen(_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _steps(killed) and victim.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    steps_at_kill = _steps(killed)
    assert steps_at_kill and steps_at_kill[-1] < 120

    resumed = subprocess.run(_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {steps_at_kill[-1]}" in resumed.stdout
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
  finally:
    if ref.poll() is None:
      ref.kill()
      ref.communicate()

  a = json.loads((full / "metrics.json").read_text())
  b = json.loads((killed / "metrics.json").read_text())
  assert a == b  # same final loss, sparsity, accuracy and bytes of every recipe, bit for bit
  assert a["step"] == 120 and abs(a["sparsity"] - 0.9) < 0.005
  # The resumed run wrote each TensorBoard point once, and the eval curve is complete.
  counts = wd.count_points(killed / "tensorboard")
  assert set(counts.values()) == {1}
  assert sorted(s for tag, s in counts if tag == "train/loss") == list(range(10, 121, 10))
  assert [p["step"] for p in b["eval_curve"]] == list(range(20, 121, 20))
  assert json.loads((killed / "config.json").read_text())["dense_steps"] == 40


def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path):
  """A run whose latest checkpoint is truncated resumes from the step before, same result."""
  import jaxmem

  config = _digits.tiny(_digits.default_config.get_config())
  work = tmp_path / "w"
  ref = _digits.train.train_and_evaluate(config, str(tmp_path / "ref"))
  config.finetune_steps = 0  # stop at step 4 ...
  _digits.train.train_and_evaluate(config, str(work))
  for f in (work / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:8])
  config.finetune_steps = 2  # ... then continue to step 6 from the last good step (2)
  config.allow_config_change = True  # finetune_steps 0 -> 2: a changed config, on purpose
  with pytest.warns(jaxmem.checkpoint.CheckpointFallbackWarning, match="restored step 2"):
    got = _digits.train.train_and_evaluate(config, str(work))
  assert got == ref

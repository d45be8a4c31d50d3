"""The main jobs' command line (``python -m jaxmem.models.minilm``, ``... .llama``): absl flags
and ml_collections configs, help, overrides, refusals. The jobs themselves run in
tests/test_minilm.py and tests/test_llama_evaluate.py."""

import importlib
import inspect
import re
import subprocess
import sys

import pytest
from absl import flags

from jaxmem.models import _cli

JOBS = ("jaxmem.models.minilm", "jaxmem.models.llama")


def _job(name):
  return importlib.import_module(f"{name}.__main__"), importlib.import_module(f"{name}.config")


def _python(*args, cwd=None):
  return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=cwd)


def _done(proc):
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err


def test_help_documents_every_flag_and_config_field(tmp_path):
  runs = [(job, "--help") for job in JOBS] + [(JOBS[0], "--helpfull")]
  procs = {(job, arg): _python("-m", job, arg, cwd=tmp_path) for job, arg in runs}
  results = {key: _done(proc) for key, proc in procs.items()}
  for (job, arg), (rc, out, err) in results.items():
    assert rc == 1, (job, arg, err)  # absl: --help prints the flags and exits 1
    _, config = _job(job)
    head, flag_help = out.split("\nflags:\n", 1)
    assert "--workdir: Directory the job writes" in flag_help
    assert "--config: A Python file whose get_config()" in flag_help
    for key, value in config.get_config().items():
      # --config's help lists it with its default (compared without absl's line breaks)
      assert f"-{key}({value!r}):" in re.sub(r"\s", "", flag_help), (job, key)
      assert f"\n  {key} (" in head, (job, key)  # and so does the module docstring
    if arg == "--help":  # this job's flags only
      assert "Try --helpfull" in flag_help and "absl.app:" not in flag_help
    else:  # every flag: absl's too
      assert "absl.app:" in flag_help and "--[no]helpfull: show full help" in flag_help
  assert not list(tmp_path.iterdir())  # help writes nothing


def test_config_modules_document_every_field():
  for job in JOBS:
    main, config = _job(job)
    docs = _cli.field_docs(config)
    assert list(docs) and set(docs) == set(config.get_config()), job
    assert all(len(text) > 15 for text in docs.values())
    # Each field of get_config() has a comment on the line above its assignment.
    lines = inspect.getsource(config.get_config).splitlines()
    for i, line in enumerate(lines):
      if line.strip().startswith("config.") and "=" in line:
        assert lines[i - 1].strip().startswith("#"), (job, line)
    assert main.__doc__ and "--config.<field>=<value>" in main.__doc__


def test_the_cli_takes_a_spaced_workdir_and_refuses_unknown_recipes_first(tmp_path):
  workdir = tmp_path / "w"
  bad_recipe = _python("-m", "jaxmem.models.minilm", "--workdir", str(workdir),
                       "--config.recipes=fp32,int9")
  bad_field = _python("-m", "jaxmem.models.llama", "--workdir", str(workdir),
                      "--config.window=8")
  (rc, _, err), (rc2, _, err2) = map(_done, (bad_recipe, bad_field))
  assert rc == 1 and "unknown recipe 'int9'; use one of fp32, int8_weight," in err
  assert "Traceback" not in err
  assert rc2 == 1 and "no field 'window'" in err2 and 'Did you mean "windows"' in err2
  assert not workdir.exists()  # refused before anything is written


def test_main_parses_its_own_flags_each_call(tmp_path):
  from jaxmem.models.minilm import __main__ as job
  from jaxmem.models.minilm import config

  kwargs = dict(config_module=config, workdir_help="w")
  fv = _cli.parse([f"--workdir={tmp_path}", "--config.num_sentences=64",
                   "--config.recipes=fp32,int8_dynamic", "--noconfig.progress"], "prog", **kwargs)
  assert fv.workdir == str(tmp_path) and fv.config.num_sentences == 64
  assert fv.config.recipes == "fp32,int8_dynamic" and fv.config.progress is False
  assert job.recipe_names(fv.config) == ["fp32", "int8_dynamic"]
  fv = _cli.parse(["--workdir", str(tmp_path)], "prog", **kwargs)  # nothing carried over
  assert fv.config.to_dict() == config.get_config().to_dict()
  assert "workdir" not in flags.FLAGS and "config" not in flags.FLAGS
  with pytest.raises(flags.IllegalFlagValueError, match="num_sentences"):
    _cli.parse(["--workdir=x", "--config.num_sentences=many"], "prog", **kwargs)
  with pytest.raises(flags.IllegalFlagValueError, match='Did you mean "batch_size"'):
    _cli.parse(["--workdir=x", "--config.batch_sise=4"], "prog", **kwargs)
  with pytest.raises(flags.IllegalFlagValueError, match="--workdir"):
    _cli.parse(["--config.batch_size=4"], "prog", **kwargs)
  with pytest.raises(ValueError, match="unexpected arguments"):
    _cli.parse(["--workdir=x", "extra"], "prog", **kwargs)


def test_another_config_file_and_its_fields(tmp_path):
  from jaxmem.models.llama import __main__ as job

  source = tmp_path / "mine.py"
  source.write_text(inspect.getsource(job._config).replace("config.windows = 4",
                                                           "config.windows = 16"))
  fv = _cli.parse([f"--workdir={tmp_path}", f"--config={source}", "--config.repeats=1"],
                  "prog", config_module=job._config, workdir_help="w")
  assert fv.config.windows == 16 and fv.config.repeats == 1
  assert job.recipe_names(fv.config) == job._config.get_config().recipes.split(",")
  fewer = tmp_path / "fewer.py"
  fewer.write_text("import ml_collections\n\ndef get_config():\n"
                   "  return ml_collections.ConfigDict({'windows': 2, 'extra': 1})\n")
  fv = _cli.parse([f"--workdir={tmp_path}", f"--config={fewer}"], "prog",
                  config_module=job._config, workdir_help="w")
  with pytest.raises(ValueError, match=r"missing fields \[.*'recipes'.*unknown fields \['extra'\]"):
    job.recipe_names(fv.config)


@pytest.mark.parametrize("job", JOBS)
def test_bad_recipes_fail_before_the_model_loads(job, tmp_path, monkeypatch):
  main, _ = _job(job)
  loader = "load" if job.endswith("minilm") else None

  def refuse(*args, **kwargs):
    raise AssertionError("the model loaded")

  if loader:
    monkeypatch.setattr(main, loader, refuse)
    source = {}
  else:
    source = {"source": refuse}
  with pytest.raises(ValueError, match=r"unknown recipe 'int9'.*fp32, int8_weight, "):
    main.main([f"--workdir={tmp_path / 'w'}", "--config.recipes=fp32,int9"], **source)
  with pytest.raises(ValueError, match="no recipe named"):
    main.main([f"--workdir={tmp_path / 'w'}", "--config.recipes= , "], **source)
  with pytest.raises(ValueError, match=">= 1"):
    main.main([f"--workdir={tmp_path / 'w'}", "--config.batch_size=0"], **source)
  assert not (tmp_path / "w").exists()

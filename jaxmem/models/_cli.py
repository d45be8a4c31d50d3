"""The main jobs' command line: absl flags and an ml_collections config, as the experiments.

Each job (``python -m jaxmem.models.minilm``, ``python -m jaxmem.models.llama``) has two
flags: ``--workdir`` and ``--config``, a Python file with a ``get_config()`` (default: the
``config.py`` next to the job), whose fields ``--config.<field>=<value>`` overrides. The
config module's docstring documents its fields, one ``  name: text`` line each (text lines
after it indented further) below a ``Fields:`` line; :func:`define_flags` copies that list,
with each field's default, into the help of ``--config``.

From Python a job's ``main(argv)`` parses ``argv`` with a :class:`absl.flags.FlagValues` of
its own (:func:`parse`), so calls share no flag state; ``python -m`` runs it under
:func:`absl.app.run` on ``absl.flags.FLAGS`` (:func:`run_app`: ``--help``, ``--helpfull``,
``--flagfile``, ``--verbosity``).
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sys
import types
import warnings
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_dict, config_flags


def _plain(text: str) -> str:
  """``text`` without Sphinx roles and literals (for ``--help``)."""
  text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
  return text.replace("``", "")


def field_docs(config_module: types.ModuleType) -> dict[str, str]:
  """``{field: description}`` from the ``Fields:`` list of ``config_module``'s docstring."""
  doc = config_module.__doc__ or ""
  docs: dict[str, str] = {}
  name = None
  for line in doc.split("Fields:", 1)[-1].splitlines():
    m = re.match(r"^  (\w+): (.*)$", line)
    if m:
      name = m.group(1)
      docs[name] = m.group(2).strip()
    elif name and line.startswith("    ") and line.strip():
      docs[name] += " " + line.strip()
    elif line.strip():
      name = None
  return docs


def config_help(config_module: types.ModuleType) -> str:
  """The help of ``--config``: how to override, then every field with its default."""
  defaults = config_module.get_config()
  docs = field_docs(config_module)
  lines = [
      "A Python file whose get_config() returns the job's config (default: this job's "
      f"{pathlib.Path(config_module.__file__).name}, shown here). Override one field with "
      "--config.<field>=<value>. Fields (default):"
  ]
  for key, value in defaults.items():
    lines.append(f"- {key} ({value!r}): {_plain(docs.get(key, ''))}")
  return "\n".join(lines)


@contextlib.contextmanager
def _loading_configs():
  """ml_collections loads config files with the deprecated ``SourceFileLoader.load_module``:
  that warning is not the caller's."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    yield


def define_flags(fv: flags.FlagValues, *, config_module: types.ModuleType, workdir_help: str,
                 module_name: str, argv: Sequence[str] | None = None) -> None:
  """Defines ``--workdir`` (required) and ``--config`` on ``fv``, listed under
  ``module_name`` (the module whose flags ``--help`` shows).

  ``argv`` (program name first) is the command line the config overrides are read from;
  None: ``sys.argv``, as :func:`absl.app.run` parses.

  Raises:
    absl.flags.IllegalFlagValueError: ``argv`` overrides a field the config lacks.
  """
  flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv, module_name=module_name)
  try:  # parses the default file now, and defines the --config.<field> overrides in argv
    with _loading_configs():
      config_flags.DEFINE_config_file(
          "config", config_module.__file__, config_help(config_module), flag_values=fv,
          lock_config=True, sys_argv=None if argv is None else list(argv))
  except AttributeError as e:  # --config.<field> of no field (the message suggests one)
    msg = e
    while isinstance(msg, BaseException) and msg.args:  # an AttributeError of a KeyError
      msg = msg.args[0]
    raise flags.IllegalFlagValueError(f"--config: no field {msg}") from None
  fv.register_flag_by_module(module_name, fv["config"])
  flags.mark_flag_as_required("workdir", flag_values=fv)


def parse(argv: Sequence[str] | None, prog: str, **kwargs) -> flags.FlagValues:
  """A fresh :class:`~absl.flags.FlagValues` with the job's flags, parsed from ``argv``
  (without the program name; default ``sys.argv[1:]``).

  Raises:
    absl.flags.Error: a bad flag or value (``--config.<field>`` of no field included), or no
      ``--workdir``.
    ValueError: positional arguments.
  """
  argv = [prog, *(sys.argv[1:] if argv is None else argv)]
  fv = flags.FlagValues()
  define_flags(fv, argv=argv, module_name=prog, **kwargs)
  with _loading_configs():  # a --config file loads now
    rest = fv(argv)
  if len(rest) > 1:
    raise ValueError(f"unexpected arguments {rest[1:]}; every option is a --flag.")
  return fv


def check_config(config: config_dict.ConfigDict, config_module: types.ModuleType) -> None:
  """A config from another file must have exactly the default's fields.

  Raises:
    ValueError: a field is missing or unknown (the message names the fields).
  """
  want, got = set(config_module.get_config()), set(config)
  if want != got:
    raise ValueError(
        f"--config: missing fields {sorted(want - got)}, unknown fields {sorted(got - want)}; "
        f"the fields are {', '.join(config_module.get_config())}.")


def recipe_list(spec: str | Sequence[str]) -> list[str]:
  """The recipe names of ``config.recipes``: a comma-separated string or a sequence.

  Raises:
    ValueError: no name is given.
  """
  names = [r.strip() for r in spec.split(",")] if isinstance(spec, str) else list(spec)
  names = [r for r in names if r]
  if not names:
    raise ValueError("--config.recipes: no recipe named.")
  return names


def quiet_logging(fv: flags.FlagValues) -> None:
  """Under :func:`absl.app.run`: WARNING unless ``--verbosity`` is given (Orbax logs every
  save at INFO)."""
  if "verbosity" in fv and not fv["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(error: Exception) -> None:
  """Exits with status 1 and absl's one-line flag error (no traceback)."""
  sys.exit(f"FATAL Flags parsing error: {error}\n"
           "Pass --help to see the flags and the config fields.")


def app_main(recipe_names, run):
  """The ``main`` that :func:`run_app` hands to :func:`absl.app.run`: checks the recipes
  (``recipe_names(config)``) before anything slow, then ``run(workdir, config)``."""

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    quiet_logging(flags.FLAGS)
    try:
      recipe_names(flags.FLAGS.config)
    except ValueError as e:
      fail(e)
    run(flags.FLAGS.workdir, flags.FLAGS.config)

  return main


def run_app(main, **define_kwargs) -> None:
  """Defines the job's flags on ``absl.flags.FLAGS`` (:func:`define_flags`, reading
  ``sys.argv``) and runs ``main`` under :func:`absl.app.run` (whose ``--help`` prints the
  flags and exits with status 1, as in every absl program)."""
  try:
    define_flags(flags.FLAGS, **define_kwargs)
  except flags.Error as e:
    fail(e)
  app.run(main)

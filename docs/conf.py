"""Sphinx configuration of jaxmem's API reference site.

Build: ``.venv/bin/sphinx-build -W -b html docs docs/_build/html`` (see docs/index.md). The
notebooks in ``notebooks/`` are kept without outputs; they are copied into ``docs/notebooks/``
(git-ignored) and myst-nb executes them on every build.
"""

import filecmp
import pathlib
import shutil

import jaxmem

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

# --- the notebooks: myst-nb reads sources inside this directory only, so copy them in (only
# when changed, so an unchanged notebook keeps its mtime and Sphinx does not re-read it).
_NB_SRC, _NB_DST = ROOT / "notebooks", DOCS / "notebooks"
_NB_DST.mkdir(exist_ok=True)
for _stale in _NB_DST.glob("*.ipynb"):
  if not (_NB_SRC / _stale.name).exists():
    _stale.unlink()
for _nb in sorted(_NB_SRC.glob("*.ipynb")):
  _dst = _NB_DST / _nb.name
  if not _dst.exists() or not filecmp.cmp(_nb, _dst, shallow=False):
    shutil.copyfile(_nb, _dst)

project = "jaxmem"
author = "jaxmem authors"
copyright = "jaxmem authors"  # noqa: A001  (Sphinx's name)
release = jaxmem.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]
# No sphinx.ext.viewcode: its source pages link back to the module an object is defined in
# (jaxmem._src.*), guessing anchors such as api/ops.html#jaxmem.quantize for names documented
# as jaxmem.ops.quantize; tests/test_docs_site.py's link check found them all broken.

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# --- autodoc / napoleon: Google-style docstrings, type hints in the descriptions.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autosummary_generate = False
add_module_names = True

# --- nitpicky cross-references: every reference to a jaxmem name must resolve. Types of other
# libraries (jax.Array, optax.GradientTransformation, numpy, flax, ...) cannot, as the build is
# offline (no intersphinx); only those are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|jnp|np|numpy|optax|flax|nn|nnx|chex|orbax|ocp|etils|epath)(\..+)?"),
    (r"py:.*", r"(typing|collections|collections\.abc|dataclasses|enum|os|pathlib|re|types)\..+"),
    (r"py:class", r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|Hashable|PyTree|Array)"),
    (r"py:class", r"(Ellipsis|NoneType|optional|ArrayLike|DTypeLike|Shape)"),
    # MemoryReport.rows holds MemoryRow values, a type no public namespace exports yet.
    (r"py:class", r"(jaxmem\._src\.memory\.)?MemoryRow"),
]

# --- myst / myst-nb: execute every notebook on every build; a failing cell fails the build.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True
nb_merge_streams = True



def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
  """NamedTuple fields are documented from the class's ``Attributes:`` section; skip the
  generated "Alias for field number N" members, which would describe each field twice."""
  doc = getattr(obj, "__doc__", None) or ""
  if what == "class" and doc.startswith("Alias for field number"):
    return True
  return None


def setup(app):
  app.connect("autodoc-skip-member", _skip_namedtuple_aliases)


# --- HTML
html_theme = "sphinx_book_theme"
html_title = f"jaxmem {release}"
html_theme_options = {"show_toc_level": 2, "use_download_button": False}
html_static_path = []

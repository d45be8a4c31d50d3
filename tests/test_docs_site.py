"""The API reference site (docs/) builds with warnings as errors, notebooks executed, links sound.

One test builds the site once (``sphinx-build -W --keep-going -b html docs <tmp>``; docs/conf.py
turns nitpicky cross-references on and has myst-nb execute every notebook, a failing cell failing
the build) and then checks the HTML: every relative ``href``/``src`` points to an existing file,
every ``#anchor`` to an ``id`` in its page, each namespace's ``__all__`` is documented on its API
page, and the executed notebooks' pages hold outputs. (One test, not several sharing a fixture:
with ``pytest -n 2`` a module-scoped fixture would build the site once per worker.)
"""

import html.parser
import importlib
import pathlib
import re
import subprocess
import sys
import types
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# API page -> module whose __all__ it documents.
API_PAGES = {
    "jaxmem": "jaxmem", "ops": "jaxmem.ops", "sparsity": "jaxmem.sparsity",
    "train": "jaxmem.train", "optim": "jaxmem.optim", "memory": "jaxmem.memory",
    "distributed": "jaxmem.distributed", "checkpoint": "jaxmem.checkpoint",
    "testing": "jaxmem.testing",
}
EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, data:, ...
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Page(html.parser.HTMLParser):
  """Collects a page's ids (and <a name>s) and its links (href of any tag, src of img/script)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.ids, self.links = set(), []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    for key in ("id",) + (("name",) if tag == "a" else ()):
      if attrs.get(key):
        self.ids.add(attrs[key])
    if attrs.get("href") is not None:
      self.links.append(attrs["href"])
    if tag in ("img", "script", "iframe", "source") and attrs.get("src"):
      self.links.append(attrs["src"])


def _parse(path):
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


def _build_failure(proc):
  """The build's output, plus the traceback files Sphinx saved (a failing notebook cell's
  source and traceback are only there when myst-nb raises), without terminal colours."""
  out = proc.stdout + proc.stderr
  saved = []
  for log in re.findall(r"(/\S*sphinx-err-\S+\.log)", out):
    p = pathlib.Path(log)
    if p.exists():
      saved.append(f"\n===== {log} =====\n{p.read_text(errors='replace')}")
  # The cell traceback (nbclient's CellExecutionError) is the useful part of a saved log.
  text = ANSI.sub("", out[-20000:] + "".join(saved)[-30000:])
  return f"sphinx-build exited with {proc.returncode}:\n{text}"


def _broken_links(html_dir):
  # _static/ holds the theme's Jinja templates (*.html, not pages) next to its assets.
  pages = {p: _parse(p) for p in html_dir.rglob("*.html")
           if p.relative_to(html_dir).parts[0] != "_static"}
  broken = []
  for path, page in sorted(pages.items()):
    for link in page.links:
      if not link or link == "#" or EXTERNAL.match(link):
        continue
      url = urllib.parse.urlsplit(link)
      target = path if not url.path else (path.parent / urllib.parse.unquote(url.path))
      if target.is_dir():
        target = target / "index.html"
      target = target.resolve()
      where = f"{path.relative_to(html_dir)}: {link}"
      if not target.is_file():
        broken.append(f"{where} (no file {target})")
      elif url.fragment and target.suffix == ".html":
        if target not in pages:
          pages[target] = _parse(target)
        if urllib.parse.unquote(url.fragment) not in pages[target].ids:
          broken.append(f"{where} (no id '{url.fragment}' in {target.name})")
  return broken


def test_docs_site_builds_and_links_resolve(tmp_path):
  html_dir = tmp_path / "html"
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(html_dir)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    pytest.fail(_build_failure(proc), pytrace=False)

  broken = _broken_links(html_dir)
  assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken)

  # Every public name of every namespace has its entry (an id) on its API page.
  # A namespace in jaxmem.__all__ (jaxmem.ops, ...) is documented on its own page.
  ids = {page: _parse(html_dir / "api" / f"{page}.html").ids for page in API_PAGES}
  missing = []
  for page, module_name in API_PAGES.items():
    module = importlib.import_module(module_name)
    if f"module-{module_name}" not in ids[page]:
      missing.append(f"api/{page}.html: module {module_name}")
    for name in module.__all__:
      full = f"{module_name}.{name}"
      if isinstance(getattr(module, name), types.ModuleType):
        where, anchor = name, f"module-{full}"
      else:
        where, anchor = page, full
      if anchor not in ids.get(where, ()):
        missing.append(f"api/{where}.html: {full}")
  assert not missing, "undocumented public names:\n" + "\n".join(missing)
  assert "jaxmem.quantize_int8" in (html_dir / "api" / "jaxmem.html").read_text()

  # The notebooks (and the quickstart) were executed: their pages hold outputs.
  executed = [f"notebooks/{p.stem}.html" for p in NOTEBOOKS] + ["getting_started.html"]
  for page in executed:
    text = (html_dir / page).read_text()
    assert 'class="cell_output' in text, f"{page} has no executed output"
  assert len(NOTEBOOKS) >= 3


def test_getting_started_quickstart_is_the_readmes():
  """docs/getting_started.md executes the README's Quickstart block, verbatim."""
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quickstart", 1)[1]
  quickstart = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
  page = (DOCS / "getting_started.md").read_text()
  cell = re.search(r"```\{code-cell\} python\n(.*?)```", page, flags=re.S).group(1)
  assert cell == quickstart, "update docs/getting_started.md's code cell to README's Quickstart"


def test_every_notebook_is_in_the_docs_toctree():
  toc = (DOCS / "notebooks.md").read_text()
  missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}\n" not in toc]
  assert not missing, f"add to docs/notebooks.md's toctree: {missing}"

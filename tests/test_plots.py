"""jaxmem.models._plots: the Pareto front helper and the Pareto plot."""

import math

import pytest

pytest.importorskip("matplotlib")

from jaxmem.models import _plots  # noqa: E402

ACC = [  # bytes vs accuracy, higher is better
    {"recipe": "fp32", "bytes": 1000, "accuracy": 0.98},
    {"recipe": "int8", "bytes": 260, "accuracy": 0.975},
    {"recipe": "int4", "bytes": 150, "accuracy": 0.96},  # pruned_int8: smaller and better
    {"recipe": "pruned_fp32", "bytes": 300, "accuracy": 0.97},  # int8 is smaller and better
    {"recipe": "pruned_int8", "bytes": 60, "accuracy": 0.965},
    {"recipe": "tie", "bytes": 60, "accuracy": 0.95},  # same bytes, worse
]

PPL = [  # weight bytes vs perplexity, lower is better
    {"method": "fp32", "weight_bytes": 538_000_000, "ppl": 17.2},
    {"method": "int8_weight", "weight_bytes": 170_000_000, "ppl": 17.25},
    {"method": "int8_dynamic", "weight_bytes": 140_000_000, "ppl": 17.6},
    {"method": "int4_g128", "weight_bytes": 87_000_000, "ppl": 19.9},
    {"method": "int4_gptq_g128", "weight_bytes": 87_000_000, "ppl": 18.4},
    {"method": "gguf_native", "weight_bytes": 100_000_000, "ppl": 17.2},
    {"method": "magnitude_50", "weight_bytes": 400_000_000, "ppl": 60.0},
    {"method": "sparsegpt_50+int4_g128", "weight_bytes": 70_000_000, "ppl": 28.0},
    {"method": "broken", "weight_bytes": 90_000_000, "ppl": math.nan},
]


def test_pareto_front_higher_is_better():
  front = _plots.pareto_front(ACC, "bytes", "accuracy")
  assert [r["recipe"] for r in front] == ["pruned_int8", "int8", "fp32"]


def test_pareto_front_lower_is_better():
  front = _plots.pareto_front(PPL, "weight_bytes", "ppl", higher_is_better=False)
  # The smallest model first, then each one strictly better than everything smaller; the
  # NaN row is left out, fp32 (same ppl as gguf_native, more bytes) is not on the front.
  assert [r["method"] for r in front] == ["sparsegpt_50+int4_g128", "int4_gptq_g128",
                                          "gguf_native"]
  # Read the other way round it is the higher-is-better front of -ppl.
  neg = [{**r, "ppl": -r["ppl"]} for r in PPL]
  assert front == [next(r for r in PPL if r["method"] == n["method"])
                   for n in _plots.pareto_front(neg, "weight_bytes", "ppl")]


def test_format_bytes_and_log_ticks():
  assert _plots.format_bytes(999) == "999 B"
  assert _plots.format_bytes(20_000) == "20 KB"
  assert _plots.format_bytes(1_234_567) == "1.23 MB"
  assert _plots.format_bytes(2e9) == "2 GB"
  assert _plots.log_ticks(10_000, 500_000) == [10_000, 20_000, 50_000, 100_000, 200_000,
                                               500_000]
  assert _plots.log_ticks(1e3, 1e7) == [1e3, 1e4, 1e5, 1e6, 1e7]
  narrow = _plots.log_ticks(85e6, 95e6)
  assert len(narrow) >= 3 and all(84e6 <= t <= 96e6 for t in narrow)


@pytest.mark.parametrize("rows, kw", [
    (ACC, {"x": "bytes", "y": "accuracy"}),
    (PPL, {"x": "weight_bytes", "y": "ppl", "label": "method", "higher_is_better": False}),
])
def test_pareto_plot_png_labels_do_not_overlap(tmp_path, monkeypatch, rows, kw):
  import matplotlib.image
  from matplotlib.text import Text

  seen = {}
  save = _plots._save

  def capture(fig, path):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    seen["labels"] = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]
    seen["frame"] = ax.get_window_extent(renderer)
    seen["xticks"] = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    seen["legend"] = ax.get_legend().get_window_extent(renderer)
    save(fig, path)

  monkeypatch.setattr(_plots, "_save", capture)
  path = tmp_path / "p.png"
  _plots.pareto_plot(rows, path=path, title="t", xlabel="bytes", ylabel="y", **kw)
  img = matplotlib.image.imread(path)
  assert img.shape[:2] == (540, 840)  # FIGSIZE (7, 4.5) at DPI 120
  assert img[..., :3].std() > 0.05
  label = kw.get("label", "recipe")
  finite = [r for r in rows if math.isfinite(r[kw["y"]])]
  assert sorted(t for t, _ in seen["labels"]) == sorted(r[label] for r in finite)
  boxes = [b for _, b in seen["labels"]]
  for i, a in enumerate(boxes):
    assert seen["frame"].contains(a.x0, a.y0) and seen["frame"].contains(a.x1, a.y1)
    assert not a.overlaps(seen["legend"])
    for b in boxes[i + 1:]:
      assert not a.overlaps(b), (seen["labels"][i][0], a, b)
  assert len(seen["xticks"]) >= 3 and all(t.endswith("B") for t in seen["xticks"])


def test_pareto_plot_of_no_rows_still_writes(tmp_path):
  _plots.pareto_plot([], x="bytes", y="accuracy", path=tmp_path / "empty.png", title="t",
                     xlabel="x", ylabel="y")
  assert (tmp_path / "empty.png").stat().st_size > 0


def test_llm_benchmark_plot_option(tmp_path):
  """``benchmarks/llm.py --plot PATH``: perplexity vs weight bytes of the ``llm`` records."""
  import importlib.util
  import pathlib

  import matplotlib.image

  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "llm.py"
  spec = importlib.util.spec_from_file_location("bench_llm", path)
  llm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(llm)
  records = [{"bench": "llm_env", "windows": 2}] + [
      {"bench": "llm", **r} for r in PPL] + [{"bench": "llm_speed", "method": "fp32"}]
  llm.plot(records, tmp_path / "llm.png")
  img = matplotlib.image.imread(tmp_path / "llm.png")
  assert img.shape[:2] == (540, 840) and img[..., :3].std() > 0.05

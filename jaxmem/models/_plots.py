"""Pareto plots of stored bytes against a quality metric (experiments and benchmarks).

``pareto_front`` is a pure helper (the rows on the front); ``pareto_plot`` draws a scatter
of the rows on a log byte axis with readable KB/MB ticks, the front as a dashed line, and one
label per point placed so that labels do not overlap each other, the points, or the legend.
Needs matplotlib (the ``examples`` extra); the Agg backend is used, no display needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

FIGSIZE = (7.0, 4.5)  # inches
DPI = 120  # so a saved plot is 840 x 540 pixels


def _finite(v: Any) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def pareto_front(rows: Sequence[dict[str, Any]], x: str, y: str,
                 higher_is_better: bool = True) -> list[dict[str, Any]]:
  """The rows on the Pareto front of small ``row[x]`` and good ``row[y]``, by increasing x.

  A row is on the front when no row with smaller-or-equal ``x`` has an equal or better ``y``
  (better: larger when ``higher_is_better``, else smaller, e.g. perplexity). Rows whose x
  or y is missing or not finite are left out.
  """
  sign = 1.0 if higher_is_better else -1.0
  ok = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
  front: list[dict[str, Any]] = []
  best = -math.inf
  for r in sorted(ok, key=lambda r: (r[x], -sign * r[y])):
    if sign * r[y] > best:
      front.append(r)
      best = sign * r[y]
  return front


def format_bytes(n: float) -> str:
  """``1234567 -> '1.23 MB'`` (powers of 1000), up to three significant digits."""
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.3g} B"


def log_ticks(lo: float, hi: float, min_ticks: int = 3) -> list[float]:
  """At least ``min_ticks`` readable values in ``[lo, hi]`` for a log axis: 1-2-5 steps or finer."""
  lo, hi = float(lo), float(hi)
  for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(range(1, 10))):
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
      ticks += [s * 10.0**e for s in subs if lo <= s * 10.0**e <= hi]
    if len(ticks) >= min_ticks:
      return ticks
  # A very narrow range: evenly spaced in log, rounded to two significant digits.
  out = []
  for v in (lo * (hi / lo) ** (i / (min_ticks)) for i in range(min_ticks + 1)):
    e = math.floor(math.log10(v)) - 1
    out.append(round(v / 10.0**e) * 10.0**e)
  return sorted(set(out))


def _overlap(a, b) -> float:
  w = min(a.x1, b.x1) - max(a.x0, b.x0)
  h = min(a.y1, b.y1) - max(a.y0, b.y0)
  return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
  """Area of ``box`` outside ``frame`` (0 when it lies inside)."""
  return box.width * box.height - _overlap(box, frame)


# Label offsets, nearest first: unit directions (dx, dy) with their text alignment, and radii
# in points. Diagonals first (a label beside its point reads best), then the axes.
_DIRECTIONS = tuple(
    (math.cos(math.radians(a)), math.sin(math.radians(a))) for a in
    (45, -45, 135, -135, 90, -90, 0, 180, 22.5, -22.5, 157.5, -157.5, 67.5, -67.5, 112.5, -112.5))
_RADII = (5, 10, 18, 28, 40, 55, 75)


def _align(dx: float, dy: float) -> tuple[str, str]:
  ha = "left" if dx > 0.3 else "right" if dx < -0.3 else "center"
  va = "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center"
  return ha, va


def _place_labels(fig, ax, points, texts, obstacles, soft, fontsize):
  """Annotates each data point at the nearest offset where its label collides with nothing."""
  from matplotlib.text import Text

  renderer = fig.canvas.get_renderer()
  frame = ax.get_window_extent(renderer)
  placed = []
  scale = fig.dpi / 72.0
  for (px, py), text in zip(points, texts, strict=True):
    best = None
    for radius in _RADII:
      for dx, dy in _DIRECTIONS:
        ha, va = _align(dx, dy)
        off = (dx * radius, dy * radius)
        ann = ax.annotate(text, (px, py), xytext=off, textcoords="offset points", ha=ha, va=va,
                          fontsize=fontsize, annotation_clip=False)
        ann.update_positions(renderer)
        box = Text.get_window_extent(ann, renderer).padded(1.5)
        ann.remove()
        hard = sum(_overlap(box, b) for b in placed + obstacles) + _outside(box, frame) * 10
        cost = (hard, sum(_overlap(box, b) for b in soft), radius)
        if best is None or cost < best[0]:
          best = (cost, off, ha, va, box)
        if cost[:2] == (0, 0):
          break
      if best[0][:2] == (0, 0):
        break
    (hard, _, radius), off, ha, va, box = best
    arrow = None
    if radius > _RADII[1]:  # a far label gets a leader line to its point
      arrow = {"arrowstyle": "-", "color": "0.35", "lw": 0.7, "shrinkA": 1,
               "shrinkB": 2 * scale}
    ax.annotate(text, (px, py), xytext=off, textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize, arrowprops=arrow, annotation_clip=False)
    placed.append(box)


def pareto_plot(rows: Sequence[dict[str, Any]], *, x: str, y: str, label: str = "recipe",
                path: str | os.PathLike, title: str, xlabel: str, ylabel: str,
                higher_is_better: bool = True, logx: bool = True, logy: bool = False) -> None:
  """Scatter of ``row[x]`` (bytes) vs ``row[y]`` with the Pareto front, saved to ``path``.

  Each point is labelled with ``row[label]``; labels are placed so they do not overlap.
  The front (:func:`pareto_front`) is the dashed line; points on it are drawn in blue, the
  others in grey. ``logx`` uses a log x axis with KB/MB tick labels (``format_bytes``).
  ``path`` may be a local path or an ``etils.epath`` path (e.g. ``gs://...``). The image is
  ``FIGSIZE * DPI`` pixels (840 x 540).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker as mticker
  from matplotlib.transforms import Bbox

  rows = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
  front = pareto_front(rows, x, y, higher_is_better)
  on_front = {id(r) for r in front}
  fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
  try:
    xs = [float(r[x]) for r in rows]
    ys = [float(r[y]) for r in rows]
    if front:
      ax.plot([r[x] for r in front], [r[y] for r in front], "--", color="tab:blue", lw=1.2,
              alpha=0.7, label="Pareto front", zorder=1)
    for flag, color, name in ((True, "tab:blue", "on the front"), (False, "0.55", "dominated")):
      sel = [r for r in rows if (id(r) in on_front) == flag]
      if sel:
        ax.scatter([r[x] for r in sel], [r[y] for r in sel], s=36, color=color, zorder=3,
                   label=name, edgecolors="white", linewidths=0.5)
    if logx:
      ax.set_xscale("log")
    if logy:
      ax.set_yscale("log")
    if rows:
      lo, hi = min(xs), max(xs)
      if logx:
        lo, hi = (lo / 1.5, hi * 1.5) if hi / lo > 1.5 else (lo / 2.0, hi * 2.0)
      else:
        pad = (hi - lo) * 0.12 or abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
      ax.set_xlim(lo, hi)
      ylo, yhi = min(ys), max(ys)
      if logy and ylo > 0:
        ypad = (yhi / ylo) ** 0.15 if yhi > ylo else 1.2
        ax.set_ylim(ylo / ypad, yhi * ypad)
        ax.yaxis.set_major_locator(mticker.FixedLocator(log_ticks(ylo / ypad, yhi * ypad)))
        ax.yaxis.set_minor_locator(mticker.NullLocator())
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
      else:
        ypad = (yhi - ylo) * 0.15 or abs(yhi) * 0.05 or 1.0
        ax.set_ylim(ylo - ypad, yhi + ypad)
      if logx:
        ax.xaxis.set_major_locator(mticker.FixedLocator(log_ticks(lo, hi)))
        ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: format_bytes(v)))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if rows:
      legend = ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    if rows:
      fig.canvas.draw()
      renderer = fig.canvas.get_renderer()
      to_px = ax.transData.transform
      r_px = 4.0 * fig.dpi / 72.0
      pts = [tuple(to_px((a, b))) for a, b in zip(xs, ys, strict=True)]
      obstacles = [Bbox.from_extents(px - r_px, py - r_px, px + r_px, py + r_px)
                   for px, py in pts]
      obstacles.append(legend.get_window_extent(renderer))
      soft = []  # the front line: labels avoid it when they can
      fpts = [to_px((r[x], r[y])) for r in front]
      for (x0, y0), (x1, y1) in zip(fpts, fpts[1:]):
        for t in [i / 24 for i in range(25)]:
          cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
          soft.append(Bbox.from_extents(cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5))
      order = sorted(range(len(rows)), key=lambda i: -ys[i] if higher_is_better else ys[i])
      _place_labels(fig, ax, [(xs[i], ys[i]) for i in order], [str(rows[i][label]) for i in order],
                    obstacles, soft, fontsize=8)
    _save(fig, path)
  finally:
    plt.close(fig)


def _save(fig, path) -> None:
  s = os.fspath(path)
  if "://" in s:  # a remote etils.epath path: matplotlib writes to the file object
    from etils import epath

    p = epath.Path(s)
    with p.open("wb") as f:
      fig.savefig(f, format=p.suffix.lstrip(".") or "png")
  else:
    fig.savefig(s)

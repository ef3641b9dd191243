"""Pictures of a run from its event log (matplotlib, Agg, PNG).

`plot_run(log, out_dir)` draws

- `lifecycle.png`: one row per seed (`layer/seed`), epochs across, coloured by stage;
- `health.png`: the health report over epochs (seeds x epochs) for `chunk_variance` (log
  scale), `dead_node_ratio` and `avg_inter_node_correlation`, one panel each;
- `curves.png`: training / validation loss, the validation metric, and the parameter count
  (active and allocated) against epoch, with the epochs of emergency rollbacks and the
  germinations, fossilizations and culls marked.

`plot_comparison(rows, out_path)` draws "metric against parameters" with error bars for a
table of models (grown, fixed-small, fixed-large, ...).

`plot_metric_vs_flops(result, out_path)` draws each growth variant's validation metric
against its cumulative training FLOPs, with fixed-large's final validation figure as the line
to reach, from a `experiments.run_protocol` result or the JSON file written from one.

`plot_es_curves(history, out_path)` draws the curves of a learned controller's
evolution-strategies training (`examples/learn_tamiyo.py`).

From the shell: `python -m kasmina_jax.plots LOG.jsonl --out DIR` prints the paths written.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
`pyplot`, so the caller's interactive backend and open figures are left alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np

from kasmina_jax import events as events_lib
from kasmina_jax import telemetry
from kasmina_jax.lifecycle import Stage

HEALTH_METRICS = telemetry.HEALTH_FIELDS

# One colour per stage, in Stage order: greys / yellows before the child is live, blues and
# violets while it joins, greens once it has, reds / black for its ends.
STAGE_COLORS = (
    "#e5e7eb",  # DORMANT
    "#fde68a",  # GERMINATED
    "#60a5fa",  # TRAINING
    "#22d3ee",  # GRAFTING
    "#a78bfa",  # STABILIZATION
    "#f59e0b",  # EVALUATING
    "#4ade80",  # FINE_TUNING
    "#166534",  # FOSSILIZED
    "#dc2626",  # CULLED
    "#f9a8d4",  # CANCELLED
    "#111827",  # ROLLED_BACK
)
assert len(STAGE_COLORS) == len(Stage)

_MAX_LABELLED_ROWS = 48
_MISSING_COLOR = "#ffffff"


def _matplotlib():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    from matplotlib import colors  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError("kasmina_jax.plots needs matplotlib, an optional dependency: install it "
                      "with `pip install 'kasmina_jax[examples]'` (or `pip install "
                      "matplotlib`)") from err
  return matplotlib, colors, Figure


# ---------------------------------------------------------------------------------- reading


def _events(source) -> list[dict]:
  if isinstance(source, (str, os.PathLike)):
    return events_lib.read_events(source)
  events = list(source)
  for i, e in enumerate(events):
    if not isinstance(e, dict) or "type" not in e:
      raise TypeError(f"events[{i}]: expected an event record (a dict with a 'type'), got "
                      f"{type(e).__name__}")
  return events


def epoch_records(events: Iterable[dict]) -> list[dict]:
  """The `epoch` records, one per epoch (the last written wins: a resumed run re-logs the
  epochs after its checkpoint), in epoch order."""
  by_epoch: dict[int, dict] = {}
  for e in events:
    if e.get("type") == "epoch" and e.get("epoch") is not None:
      by_epoch[int(e["epoch"])] = e
  return [by_epoch[k] for k in sorted(by_epoch)]


def _layer_rows(records: list[dict], field: str) -> list[tuple[str, int]]:
  """`(layer, seed)` rows in order of first appearance, from `record[field][layer]` lists
  (for `health`, the lists under any metric)."""
  widths: dict[str, int] = {}
  for r in records:
    for layer, value in (r.get(field) or {}).items():
      if isinstance(value, dict):
        n = max((len(v) for v in value.values() if isinstance(v, list)), default=0)
      else:
        n = len(value) if isinstance(value, list) else 0
      widths[layer] = max(widths.get(layer, 0), n)
  return [(layer, k) for layer, n in widths.items() for k in range(n)]


def _matrix(records, rows, get) -> np.ndarray:
  """(rows, epochs) float matrix, NaN where a record lacks the value."""
  index = {row: i for i, row in enumerate(rows)}
  out = np.full((len(rows), len(records)), np.nan)
  for j, r in enumerate(records):
    for (layer, k), i in index.items():
      values = get(r, layer)
      if isinstance(values, list) and k < len(values) and values[k] is not None:
        out[i, j] = float(values[k])
  return out


def stage_matrix(events: Sequence[dict]) -> tuple[list[tuple[str, int]], list[int], np.ndarray]:
  """`(rows, epochs, stages)`: each seed's stage at each logged epoch end (NaN: unknown).

  From the `epoch` records' `stages`; without any, replayed from the `transition` records
  (every seed that ever moved, DORMANT before its first transition).
  """
  records = epoch_records(events)
  if records and any(r.get("stages") for r in records):
    rows = _layer_rows(records, "stages")
    epochs = [int(r["epoch"]) for r in records]
    return rows, epochs, _matrix(records, rows, lambda r, layer: (r.get("stages") or {}).get(layer))
  transitions = sorted((e for e in events if e.get("type") == "transition"),
                       key=lambda e: (e.get("epoch") or 0))
  if not transitions:
    return [], [], np.zeros((0, 0))
  rows = list(dict.fromkeys((str(t["layer"]), int(t["seed"])) for t in transitions))
  epochs = sorted({int(t.get("epoch") or 0) for t in transitions})
  index = {row: i for i, row in enumerate(rows)}
  current = np.full(len(rows), float(Stage.DORMANT))
  out = np.zeros((len(rows), len(epochs)))
  pos = 0
  for j, epoch in enumerate(epochs):
    while pos < len(transitions) and int(transitions[pos].get("epoch") or 0) <= epoch:
      t = transitions[pos]
      current[index[(str(t["layer"]), int(t["seed"]))]] = float(Stage[t["to_stage"]])
      pos += 1
    out[:, j] = current
  return rows, epochs, out


def _rollback_epochs(events: Sequence[dict]) -> list[int]:
  found = set()
  for e in events:
    if e.get("epoch") is None:
      continue
    if e.get("type") == "rollback" or (e.get("type") == "epoch"
                                       and (e.get("extra") or {}).get("rolled_back")):
      found.add(int(e["epoch"]))
  return sorted(found)


# --------------------------------------------------------------------------------- drawing


def _edges(values: Sequence[float]) -> np.ndarray:
  """Cell edges around sorted centres (half-way between neighbours)."""
  v = np.asarray(values, dtype=float)
  if len(v) == 1:
    return np.array([v[0] - 0.5, v[0] + 0.5])
  mid = (v[1:] + v[:-1]) / 2
  return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _row_axis(ax, rows: list[tuple[str, int]]) -> None:
  """Row labels `layer/seed` (only the layers' first rows when there are many), with lines
  between layers."""
  n = len(rows)
  ax.set_ylim(n - 0.5, -0.5)
  if n <= _MAX_LABELLED_ROWS:
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{layer}/{k}" for layer, k in rows], fontsize=7 if n > 24 else 8)
  else:  # every `stride`-th seed of each layer
    stride = 1
    while n / stride > _MAX_LABELLED_ROWS:
      stride *= 2
    ticks = [i for i, (_, k) in enumerate(rows) if k % stride == 0]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{rows[i][0]}/{rows[i][1]}" for i in ticks], fontsize=7)
  for i in range(1, n):
    if rows[i][0] != rows[i - 1][0]:
      ax.axhline(i - 0.5, color="black", linewidth=1.0)


def _epoch_axis(ax) -> None:
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_xlabel("epoch")


def _figure_height(rows: int, base: float = 1.6, per_row: float = 0.22) -> float:
  return min(max(base + per_row * rows, 2.8), 18.0)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight", facecolor="white")
  return path


def _empty_figure(Figure, path: str, title: str, message: str) -> str:
  fig = Figure(figsize=(6, 2))
  ax = fig.subplots()
  ax.set_axis_off()
  ax.set_title(title)
  ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
  return _save(fig, path)


def plot_lifecycle(events: Sequence[dict], out_path) -> str:
  """The lifecycle timeline: rows = layer/seed, x = epoch, colour = stage."""
  _, colors, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  rows, epochs, stages = stage_matrix(events)
  title = "Seed lifecycle"
  if not rows:
    return _empty_figure(Figure, out_path, title, "no epoch or transition records in the log")
  cmap = colors.ListedColormap(STAGE_COLORS).with_extremes(bad=_MISSING_COLOR)
  norm = colors.BoundaryNorm(np.arange(len(Stage) + 1) - 0.5, len(Stage))
  fig = Figure(figsize=(min(max(6.0, 0.12 * len(epochs) + 4.0), 16.0), _figure_height(len(rows))))
  ax = fig.subplots()
  ax.pcolormesh(_edges(epochs), np.arange(len(rows) + 1) - 0.5,
                np.ma.masked_invalid(stages), cmap=cmap, norm=norm, shading="flat",
                edgecolors="white" if len(rows) * len(epochs) <= 4000 else "face",
                linewidth=0.3)
  _row_axis(ax, rows)
  for epoch in _rollback_epochs(events):
    ax.axvline(epoch, color="black", linestyle="--", linewidth=1.2)
  _epoch_axis(ax)
  ax.set_title(title + (" (dashed: emergency rollback)" if _rollback_epochs(events) else ""))
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  handles = [Patch(facecolor=STAGE_COLORS[s], edgecolor="#6b7280", label=s.name)
             for s in Stage]
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
            frameon=False, title="stage", title_fontsize=9)
  return _save(fig, out_path)


def plot_health(events: Sequence[dict], out_path) -> str:
  """The health report over epochs: one heatmap (seeds x epochs) per metric."""
  _, colors, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  records = [r for r in epoch_records(events) if r.get("health")]
  title = "Seed health"
  if not records:
    return _empty_figure(Figure, out_path, title, "no health records in the log")
  rows = _layer_rows(records, "health")
  epochs = [int(r["epoch"]) for r in records]
  height = _figure_height(len(rows), base=2.0)
  fig = Figure(figsize=(min(max(10.0, 0.3 * len(epochs) + 8.0), 20.0), height),
               layout="constrained")
  axes = fig.subplots(1, len(HEALTH_METRICS), sharey=True)
  for ax, metric in zip(axes, HEALTH_METRICS):
    data = _matrix(records, rows,
                   lambda r, layer, m=metric: ((r.get("health") or {}).get(layer) or {}).get(m))
    cmap = _get_cmap("viridis" if metric != "dead_node_ratio" else "magma_r").with_extremes(
        bad="#d1d5db")
    label = metric
    if metric == "chunk_variance":
      positive = data[np.isfinite(data) & (data > 0)]
      if positive.size:
        lo, hi = float(positive.min()), float(positive.max())
        if hi <= lo:
          hi = lo * 10.0
        data = np.where(np.isfinite(data) & (data <= 0), lo, data)  # zero variance at the floor
        norm = colors.LogNorm(vmin=lo, vmax=hi)
        label = "chunk_variance (log)"
      else:
        norm = None
    else:
      norm = colors.Normalize(vmin=0.0, vmax=1.0)
    mesh = ax.pcolormesh(_edges(epochs), np.arange(len(rows) + 1) - 0.5,
                         np.ma.masked_invalid(data), cmap=cmap, norm=norm, shading="flat")
    fig.colorbar(mesh, ax=ax, shrink=min(1.0, 6.0 / height), aspect=25, pad=0.02)
    ax.set_title(label, fontsize=10)
    _epoch_axis(ax)
    for epoch in _rollback_epochs(events):
      ax.axvline(epoch, color="white", linestyle="--", linewidth=1.0)
  for i, ax in enumerate(axes):
    _row_axis(ax, rows)
    if i > 0:
      ax.tick_params(labelleft=False)
  fig.suptitle(title + " (grey: no value)", fontsize=11)
  return _save(fig, out_path)


def _get_cmap(name: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[name]


def _series(records, key) -> np.ndarray:
  return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])


def plot_curves(events: Sequence[dict], out_path, *, metric_name: str | None = None) -> str:
  """Losses, the validation metric and the parameter counts against epoch."""
  _, _, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  records = epoch_records(events)
  title = "Training curves"
  if not records:
    return _empty_figure(Figure, out_path, title, "no epoch records in the log")
  if metric_name is None:
    run = next((e for e in events if e.get("type") == "run"), {})
    metric_name = run.get("metric") or "validation metric"
  epochs = np.array([int(r["epoch"]) for r in records])
  fig = Figure(figsize=(8.0, 8.0))
  ax_loss, ax_metric, ax_params = fig.subplots(3, 1, sharex=True)

  for key, label, style in (("train_loss", "train loss", "-"), ("val_loss", "validation loss", "--")):
    values = _series(records, key)
    if np.isfinite(values).any():
      ax_loss.plot(epochs, values, style, marker=".", label=label)
  ax_loss.set_ylabel("loss")
  if _rollback_epochs(events):
    ax_loss.plot([], [], color="tab:red", linestyle="--", linewidth=1.0,
                 label="emergency rollback")
  ax_loss.legend(fontsize=8)
  ax_loss.set_title(title)

  metric = _series(records, "val_metric")
  if np.isfinite(metric).any():
    ax_metric.plot(epochs, metric, marker=".", color="tab:green")
  else:
    ax_metric.text(0.5, 0.5, "no validation metric logged", ha="center", va="center",
                   transform=ax_metric.transAxes)
  ax_metric.set_ylabel(metric_name)

  for key, label, color in (("params_active", "active", "tab:blue"),
                            ("params_allocated", "allocated", "tab:gray")):
    values = _series(records, key)
    if np.isfinite(values).any():
      ax_params.plot(epochs, values, marker=".", color=color, label=label,
                     drawstyle="steps-post")
  ax_params.set_ylabel("parameters")
  _epoch_axis(ax_params)
  ax_params.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))

  # Lifecycle events as marks along the bottom of the parameter panel.
  marks = {"GERMINATED": ("^", "tab:orange", "germinated"),
           "FOSSILIZED": ("*", "darkgreen", "fossilized"),
           "CULLED": ("x", "tab:red", "culled"),
           "ROLLED_BACK": ("v", "black", "rolled back")}
  for stage, (marker, color, label) in marks.items():
    at = [int(e["epoch"]) for e in events
          if e.get("type") == "transition" and e.get("to_stage") == stage
          and e.get("epoch") is not None]
    if at:
      counts = np.unique(at, return_counts=True)
      ax_params.scatter(counts[0], np.zeros_like(counts[0], dtype=float), marker=marker,
                        color=color, s=30 + 10 * np.minimum(counts[1], 8), label=label,
                        transform=ax_params.get_xaxis_transform(), clip_on=False, zorder=3)
  ax_params.legend(fontsize=8, ncol=3)
  for epoch in _rollback_epochs(events):
    for ax in (ax_loss, ax_metric, ax_params):
      ax.axvline(epoch, color="tab:red", linestyle="--", linewidth=1.0)
  for ax in (ax_loss, ax_metric, ax_params):
    ax.grid(alpha=0.3)
  return _save(fig, out_path)


def plot_run(source, out_dir, *, prefix: str = "") -> list[str]:
  """Draws a run's lifecycle timeline, health heatmaps and curves; returns the PNG paths.

  source: the path of a JSONL event log, or its records (`events.read_events`).
  """
  events = _events(source)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  return [
      plot_lifecycle(events, os.path.join(out_dir, f"{prefix}lifecycle.png")),
      plot_health(events, os.path.join(out_dir, f"{prefix}health.png")),
      plot_curves(events, os.path.join(out_dir, f"{prefix}curves.png")),
  ]


def plot_comparison(rows: Sequence[dict], out_path, *, metric: str = "accuracy",
                    title: str | None = None, log_x: bool | None = None) -> str:
  """Metric against parameter count, with error bars, one point per model.

  rows: dicts with `name`, `params`, `metric_mean`, `metric_std` (optional `params_std`).
  log_x: a log parameter axis (default: when the counts span more than 10x).
  """
  _, _, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  rows = list(rows)
  if not rows:
    raise ValueError("rows: expected at least one row")
  for i, r in enumerate(rows):
    missing = [k for k in ("name", "params", "metric_mean") if k not in r]
    if missing:
      raise ValueError(f"rows[{i}]: missing {missing} (need name, params, metric_mean, "
                       "metric_std)")
  params = np.array([float(r["params"]) for r in rows])
  if log_x is None:
    log_x = params.min() > 0 and params.max() / params.min() > 10
  fig = Figure(figsize=(7.0, 4.5))
  ax = fig.subplots()
  for i, r in enumerate(rows):
    std = r.get("metric_std")
    ax.errorbar(float(r["params"]), float(r["metric_mean"]),
                yerr=None if std is None or not math.isfinite(float(std)) else float(std),
                xerr=r.get("params_std"), fmt="o", capsize=4, markersize=7,
                color=f"C{i % 10}", label=str(r["name"]))
    ax.annotate(str(r["name"]), (float(r["params"]), float(r["metric_mean"])),
                textcoords="offset points", xytext=(6, 6), fontsize=8)
  if log_x:
    ax.set_xscale("log")
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _count_label(v)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("parameters")
  ax.set_ylabel(metric + " (mean ± std)")
  ax.set_title(title or f"{metric} against parameters")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  return _save(fig, out_path)


def plot_protocol(rows: Sequence[dict], out_path, *, metric: str = "accuracy",
                  title: str | None = None) -> str:
  """`plot_comparison` of `experiments.report_rows`: each variant's test metric (mean ± std
  over seeds, at its validation-chosen rate) against its final parameter count."""
  return plot_comparison(
      [{"name": f"{r['variant']} (lr {r['lr']:g})", "params": r["params"],
        "params_std": r.get("params_std"), "metric_mean": r["test_mean"],
        "metric_std": r["test_std"]} for r in rows], out_path, metric=metric, title=title)


# The growth protocol's variants in report order, one colour each (as in every figure).
_VARIANT_COLORS = {"fixed_small": "C0", "fixed_large": "C1", "ceiling": "C2", "grown": "C3"}


def _protocol_result(source) -> dict:
  """A protocol result: the dict itself, or read from the JSON file at a path."""
  if isinstance(source, (str, os.PathLike)):
    with open(source) as fh:
      return json.load(fh)
  if not isinstance(source, Mapping):
    raise TypeError(f"result: expected a run_protocol result or a path to its JSON, got "
                    f"{type(source).__name__}")
  return dict(source)


def _reach_line(result: dict) -> tuple[float | None, float | None, dict]:
  """`(target, threshold, {variant: median FLOPs to reach it})` from a result's `reach`, or
  from its rows (a JSON that kept the rows but not `reach`)."""
  reach = result.get("reach") or {}
  rows = result.get("rows") or []
  if reach.get("target") is not None:
    spent = {v: r.get("flops") for v, r in (reach.get("variants") or {}).items()}
    return float(reach["target"]), float(reach.get("threshold", reach["target"])), spent
  row = next((r for r in rows if r.get("reach_target") is not None), None)
  if row is None:
    return None, None, {}
  threshold = row.get("reach_threshold")
  return (float(row["reach_target"]),
          float(row["reach_target"] if threshold is None else threshold),
          {r["variant"]: r.get("flops_to_large") for r in rows})


def metric_flops_curves(result) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
  """`{variant: [(cumulative training FLOPs, validation metric), ...]}`, one pair of arrays
  per run of the variant's chosen rate, in seed order (from each run's `flops_curve` and
  `val_curve`). Runs without curves (results written before they were recorded) are left
  out."""
  result = _protocol_result(result)
  chosen = result.get("chosen") or {}
  out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  for run in sorted(result.get("runs") or [], key=lambda r: (r["variant"], r.get("seed", 0))):
    variant = run["variant"]
    if variant in chosen and float(run["lr"]) != float(chosen[variant]):
      continue
    flops, val = run.get("flops_curve"), run.get("val_curve")
    if not flops or val is None:
      continue
    val = np.array([np.nan if v is None else float(v) for v in val])
    out.setdefault(variant, []).append((np.asarray(flops, float), val))
  return out


def plot_metric_vs_flops(result, out_path, *, metric: str | None = None,
                         title: str | None = None) -> str:
  """Validation metric against cumulative training FLOPs (log axis) for every variant at its
  chosen rate: each seed's run as a thin line, the mean over seeds (at the mean FLOPs of each
  epoch end) as a thick one inside the band of the seeds' lowest and highest figures;
  fixed-large's final validation figure as a dashed line (the threshold it leaves with a
  tolerance dotted), and each variant's median FLOPs to reach it marked on that line.

  This is how growth is judged: reaching fixed-large's figure, and for how much compute.

  result: a `experiments.run_protocol` result, or the path of the JSON `write_report` (or
    `benchmarks/growth.py`) wrote from one; its runs need `flops_curve` and `val_curve`.
  metric: the axis label (default: the result's `metric`).
  """
  _, _, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  result = _protocol_result(result)
  curves = metric_flops_curves(result)
  if not curves:
    raise ValueError("result: no run of a chosen rate carries flops_curve and val_curve "
                     "(results written before they were recorded cannot draw this figure)")
  metric = metric or result.get("metric") or "validation metric"
  target, threshold, spent = _reach_line(result)
  fig = Figure(figsize=(7.5, 4.8))
  ax = fig.subplots()
  order = [v for v in _VARIANT_COLORS if v in curves] + sorted(
      v for v in curves if v not in _VARIANT_COLORS)
  lrs = result.get("chosen") or {}
  for i, variant in enumerate(order):
    color = _VARIANT_COLORS.get(variant, f"C{(4 + i) % 10}")
    runs = curves[variant]
    for flops, val in runs:
      ax.plot(flops, val, color=color, alpha=0.3, linewidth=0.8)
    n = min(len(f) for f, _ in runs)
    flops = np.mean([f[:n] for f, _ in runs], axis=0)
    vals = np.stack([v[:n] for _, v in runs])
    with warnings.catch_warnings():  # an epoch every seed rolled back is NaN, and stays so
      warnings.simplefilter("ignore", RuntimeWarning)
      mean, lo, hi = (np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0))
    if len(runs) > 1:
      ax.fill_between(flops, lo, hi, color=color, alpha=0.15, linewidth=0)
    lr = f"lr {float(lrs[variant]):g}, " if variant in lrs else ""
    ax.plot(flops, mean, color=color, linewidth=2.0, marker=".",
            label=f"{variant} ({lr}{len(runs)} seed{'s' if len(runs) != 1 else ''})")
  if target is not None and math.isfinite(target):
    ax.axhline(target, color="black", linestyle="--", linewidth=1.2,
               label=f"fixed-large's final val {metric} ({target:.4g})")
    if threshold is not None and threshold != target:
      ax.axhline(threshold, color="black", linestyle=":", linewidth=1.0,
                 label=f"within tolerance ({threshold:.4g})")
    marked = False
    for variant in order:
      f = spent.get(variant)
      if f is not None:
        ax.scatter([f], [threshold if threshold is not None else target], marker="v", s=70,
                   color=_VARIANT_COLORS.get(variant, "gray"), edgecolors="black",
                   zorder=4, label=None if marked else "median FLOPs to reach it")
        marked = True
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (6 × live params × tokens, cumulative)")
  ax.set_ylabel(f"validation {metric}")
  ax.set_title(title or f"{result.get('task', 'growth')}: validation {metric} against "
               "training FLOPs")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="best")
  return _save(fig, out_path)


def plot_es_curves(history: Sequence[dict], out_path, *, title: str | None = None) -> str:
  """The curves of an evolution-strategies run (`examples/learn_tamiyo.py`), one point per
  generation: the reward of the population (mean and best candidate), of the search's mean
  and of the heuristic controller on the same runs (left); the validation accuracy and the
  final parameter count of the mean and of the heuristic (right).

  history: dicts with `generation`, `fitness_mean`, `fitness_best`, `center_reward`,
  `heuristic_reward`, `center_val`, `heuristic_val`, `center_params`, `heuristic_params`.
  """
  _, _, Figure = _matplotlib()
  out_path = os.fspath(out_path)
  history = list(history)
  if not history:
    raise ValueError("history: expected at least one generation")
  need = ("generation", "fitness_mean", "fitness_best", "center_reward", "heuristic_reward",
          "center_val", "heuristic_val", "center_params", "heuristic_params")
  for i, h in enumerate(history):
    missing = [k for k in need if k not in h]
    if missing:
      raise ValueError(f"history[{i}]: missing {missing}")
  g = np.array([h["generation"] for h in history], float)
  get = lambda k: np.array([float(h[k]) for h in history])
  fig = Figure(figsize=(11.0, 4.0))
  left, mid, right = fig.subplots(1, 3)
  left.plot(g, get("fitness_mean"), label="population mean", color="C0")
  left.plot(g, get("fitness_best"), label="best candidate", color="C0", alpha=0.4, ls="--")
  left.plot(g, get("center_reward"), label="learned (search mean)", color="C2")
  left.plot(g, get("heuristic_reward"), label="heuristic", color="C3")
  left.set_ylabel("reward (val acc - costs)")
  mid.plot(g, get("center_val"), label="learned", color="C2")
  mid.plot(g, get("heuristic_val"), label="heuristic", color="C3")
  mid.set_ylabel("validation accuracy")
  right.plot(g, get("center_params"), label="learned", color="C2")
  right.plot(g, get("heuristic_params"), label="heuristic", color="C3")
  right.set_ylabel("final parameters")
  for ax in (left, mid, right):
    ax.set_xlabel("generation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  fig.suptitle(title or "learning Tamiyo by evolution strategies (training settings)")
  fig.tight_layout()
  return _save(fig, out_path)


def _count_label(value: float) -> str:
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:g}{suffix}"
  return f"{value:g}"


# -------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kasmina_jax.plots",
      description="Draw a run's lifecycle timeline, health heatmaps and curves (PNG) from "
                  "its JSONL event log.")
  parser.add_argument("log", help="the JSONL event log")
  parser.add_argument("--out", default=None,
                      help="directory for the PNGs (default: the log's directory)")
  parser.add_argument("--prefix", default="", help="prefix of the file names")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.log):
    parser.error(f"no such file: {args.log}")
  out = args.out if args.out is not None else os.path.dirname(os.path.abspath(args.log))
  try:
    paths = plot_run(args.log, out, prefix=args.prefix)
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  for path in paths:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())

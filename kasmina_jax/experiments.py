"""Growth experiments: a model grown by Tamiyo beside fixed-small, fixed-large and the
ceiling (the same model with every seed's child present and learning from step 0).

Used by the examples and `benchmarks/growth.py`; every variant trains with the same data
order, optimizer and step budget.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import nn as knn
from kasmina_jax import tamiyo
from kasmina_jax import training

VARIANTS = ("fixed_small", "fixed_large", "ceiling", "grown")


def no_growth(report, seeds, ctrl, config):
  """A policy that never commands anything (fixed models and the ceiling)."""
  del report, config
  return {k: lifecycle.no_commands(v.num_seeds) for k, v in seeds.items()}, ctrl


def children_from_start(state: training.TrainState, blueprint: str | Sequence[str],
                        key: jax.Array,
                        stage: lifecycle.Stage = lifecycle.Stage.FINE_TUNING) -> training.TrainState:
  """Every seed holds a fresh child, fully on and learning (`stage`), from now.

  `blueprint`: a name, or names in order of preference (each layer takes the first one its
  catalog holds).

  This sets stages directly, outside the gated lifecycle: it builds the *ceiling* baseline,
  not a training path.
  """
  params, kasmina = state.params, state.kasmina
  for i, (path, lv) in enumerate(knn.find_layers(state.kasmina).items()):
    spec = lv.spec
    names = (blueprint,) if isinstance(blueprint, str) else tuple(blueprint)
    held = [n for n in names if n in spec.catalog.names]
    if not held:
      raise ValueError(f"blueprint: layer {'/'.join(map(str, path))} holds none of {names}; "
                       f"its catalog: {spec.catalog.names}")
    b = spec.blueprint_id(held[0])
    cpath = knn.children_path(path)
    children = layer_lib.germinate_children(spec, knn.get_path(params, cpath), True, b,
                                            jax.random.fold_in(key, i))
    params = knn.set_path(params, cpath, children)
    seeds = lv.seeds.replace(
        stage=jnp.full_like(lv.seeds.stage, int(stage)),
        blueprint=jnp.full_like(lv.seeds.blueprint, b),
        strategy=jnp.zeros_like(lv.seeds.strategy), alpha=jnp.ones_like(lv.seeds.alpha))
    kasmina = knn.set_path(kasmina, path + ("state",), lv.replace(seeds=seeds))
  return state.replace(params=params, kasmina=kasmina, opt_state=state.tx.init(params),
                       host_snapshot=jax.tree.map(jnp.copy, params))


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float):
  return optax.adam(learning_rate)


@dataclasses.dataclass
class RunResult:
  variant: str
  seed: int
  metric: float  # held-out metric (accuracy, or loss where `metric_key` names a loss)
  val_loss: float
  params: int  # parameters the final model uses (host + active children)
  wall_time: float
  history: list
  fossilized: int
  state: training.TrainState | None = None

  def summary(self, task: str) -> str:
    """One progress line for this run."""
    return (f"{task} seed {self.seed} {self.variant:12s} acc {100 * self.metric:6.2f}%  "
            f"val loss {self.val_loss:.4f}  params {self.params:7d}  "
            f"fossilized {self.fossilized}  {self.wall_time:6.1f}s")


def run_variant(variant: str, make_model: Callable[[str], object], train: dict, test: dict,
                loss_fn: training.LossFn, *, epochs: int, batch_size: int, seed: int,
                learning_rate: float = 3e-3, config: training.TrainConfig = training.TrainConfig(),
                ceiling_blueprint: str | Sequence[str] = ("parallel_mlp", "residual_mlp"), metric_key: str = "val_accuracy",
                log_dir: str | None = None, progress: bool = False,
                keep_state: bool = False) -> RunResult:
  """Trains one variant. `make_model(variant)` builds its Linen model ("fixed_large" may
  be a wider host; the others share the small host)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
  model = make_model(variant)
  key = jax.random.key(seed)
  state = training.create_train_state(model, _adam(learning_rate), jnp.asarray(train["x"][:2]),
                                      key, config)
  if variant == "ceiling":
    state = children_from_start(state, ceiling_blueprint, jax.random.fold_in(key, 7))
  policy = tamiyo.decide if variant == "grown" else no_growth
  # Only the grown run has a lifecycle worth logging.
  log_path = (os.path.join(log_dir, f"grown_seed{seed}.jsonl")
              if (log_dir and variant == "grown") else None)
  start = time.perf_counter()
  state, history = training.fit(state, train, test, loss_fn, epochs=epochs,
                                batch_size=batch_size, policy=policy, seed=seed,
                                log_path=log_path, progress=progress,
                                description=f"{variant} seed {seed}")
  wall = time.perf_counter() - start
  last = history[-1]
  fossilized = sum(int(np.sum(np.asarray(v.seeds.stage) == lifecycle.Stage.FOSSILIZED))
                   for v in knn.find_layers(state.kasmina).values())
  return RunResult(variant=variant, seed=seed, metric=float(last.get(metric_key, np.nan)),
                   val_loss=float(last["val_loss"]), params=int(last["params"]),
                   wall_time=wall, history=history, fossilized=fossilized,
                   state=state if keep_state else None)


def summarize(results: Sequence[RunResult]) -> list[dict]:
  """Mean and standard deviation per variant (over RNG seeds)."""
  rows = []
  for variant in VARIANTS:
    rs = [r for r in results if r.variant == variant]
    if not rs:
      continue
    m = np.array([r.metric for r in rs])
    vl = np.array([r.val_loss for r in rs])
    p = np.array([r.params for r in rs])
    w = np.array([r.wall_time for r in rs])
    rows.append({"name": variant, "runs": len(rs), "metric_mean": float(m.mean()),
                 "metric_std": float(m.std(ddof=1)) if len(rs) > 1 else 0.0,
                 "val_loss_mean": float(vl.mean()), "val_loss_std": float(vl.std(ddof=1)) if len(rs) > 1 else 0.0,
                 "params": float(p.mean()), "params_std": float(p.std()),
                 "wall_time": float(w.mean()),
                 "fossilized": float(np.mean([r.fossilized for r in rs]))})
  return rows


def markdown_table(rows: Sequence[dict], metric_name: str = "accuracy") -> str:
  lines = [f"| model | runs | held-out {metric_name} | val loss | params | wall time (s) | seeds fossilized |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    scale = 100.0 if metric_name == "accuracy" else 1.0
    unit = "%" if metric_name == "accuracy" else ""
    lines.append(
        f"| {r['name']} | {r['runs']} | {scale * r['metric_mean']:.2f}{unit} ± {scale * r['metric_std']:.2f} "
        f"| {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | {r['params']:.0f} | {r['wall_time']:.1f} "
        f"| {r['fossilized']:.1f} |")
  return "\n".join(lines)


def write_report(results: Sequence[RunResult], out_dir: str, *, config: dict | None = None,
                 plots: bool = True, metric_name: str = "accuracy") -> list[dict]:
  """Writes `results.md` (the table), `results.json` (rows, settings, every run's history)
  and, with `plots`, the grown run's pictures (from `grown_seed0.jsonl` where it exists) and
  the metric-against-parameters plot. Prints the table and the plot paths; returns the rows."""
  import json  # pylint: disable=g-import-not-at-top
  rows = summarize(results)
  table = markdown_table(rows, metric_name)
  print(table)
  with open(os.path.join(out_dir, "results.md"), "w") as fh:
    fh.write(table + "\n")
  with open(os.path.join(out_dir, "results.json"), "w") as fh:
    json.dump({"config": config or {}, "rows": rows,
               "runs": [{"variant": r.variant, "seed": r.seed, "metric": r.metric,
                         "val_loss": r.val_loss, "params": r.params,
                         "fossilized": r.fossilized, "wall_time": r.wall_time,
                         "history": r.history} for r in results]}, fh, indent=1)
  if plots:
    from kasmina_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
    paths = []
    log = os.path.join(out_dir, "grown_seed0.jsonl")
    if os.path.exists(log):
      paths += plots_lib.plot_run(log, out_dir)
    paths.append(plots_lib.plot_comparison(rows, os.path.join(out_dir, f"{metric_name}_vs_params.png")))
    print("plots:", *paths, sep="\n  ")
  return rows

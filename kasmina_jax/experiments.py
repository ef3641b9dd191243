"""Growth experiments under a fair protocol: does growing beat training the right fixed model?

Four variants train on the same data, in the same order, with the same step budget:
fixed-small, fixed-large, the *ceiling* (the small model with every seed's child present and
learning from step 0) and *grown* (starts as fixed-small; Tamiyo decides).

The protocol (docs/design.md, "Growth protocol"):

* a validation split carved from the training split drives every decision: Tamiyo's
  plateau and counterfactual Δ inside `fit`, and the learning-rate choice of each variant;
* every variant gets its own learning rate, chosen on validation from a sweep (`lrs`);
* the test split is read once per run of the chosen rate, for the report (`evaluate_test`
  runs after the choice; nothing before it sees the test split);
* results are means ± standard deviations over RNG seeds, with final parameters, training
  FLOPs (forward + backward of the live parameters, summed over steps) and wall time;
* growth is judged by compute (docs/design.md, "Growth protocol"): beside the final
  figures, every variant's training FLOPs to first reach fixed-large's final validation
  figure (`flops_to_reach`, `reach_summary`), and its validation figure against training
  FLOPs epoch by epoch (`flops_curve`, `validation_curve`; `plots.plot_metric_vs_flops`).

A `Task` bundles a model family, data and settings; `sweep` runs a task's grid (optionally
in worker processes, one run each) and `select_and_test` chooses each variant's rate and reads
the test split. `report_rows` / `markdown_table` summarise, `write_report` writes the files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import orchestration as orch
from kasmina_jax import tamiyo
from kasmina_jax import training

VARIANTS = ("fixed_small", "fixed_large", "ceiling", "grown")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2)


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
                       host_snapshot=orch.drift_snapshot(params))


# ----------------------------------------------------------------------------- data


def carve_validation(train: dict, fraction: float = 0.2, *, seed: int = 0) -> tuple[dict, dict]:
  """Splits `fraction` of the training rows off as a validation set (a fixed permutation by
  `seed`). Returns `(train, val)`; the test split is never touched here."""
  if not 0.0 < float(fraction) < 1.0:
    raise ValueError(f"fraction: expected a number in (0, 1), got {fraction!r}")
  n = len(next(iter(train.values())))
  n_val = int(round(n * fraction))
  if n_val < 1 or n_val >= n:
    raise ValueError(f"fraction: {fraction} of {n} rows leaves no training or validation rows")
  order = np.random.default_rng(seed).permutation(n)
  val_idx, fit_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
  return ({k: v[fit_idx] for k, v in train.items()}, {k: v[val_idx] for k, v in train.items()})


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Task:
  """A growth experiment: a model family, its data and the run's settings.

  make_model(variant): the Linen model of a variant ("fixed_large" usually a wider host; the
    others share the small host).
  data(): `(train, val, test)` dicts of arrays, `val` carved from the training data.
  metric: the key in `fit`'s history (and of `evaluate_variables`) that the report shows:
    "accuracy" or "loss"; `higher_is_better` says which way is better.
  select_on: what picks the learning rate on validation ("loss" or "accuracy").
  eval_batch: rows per evaluation pass on the test split.
  tokens_per_row: tokens a training row carries, for the FLOPs count (a sequence task's row
    is a window of T tokens and costs T times a row of one; 1 for one input a row).
  reach_tolerance: how close to fixed-large's final validation figure counts as reaching it,
    in the metric's units (e.g. 0.01 nats for an LM task; 0.005 is half a point of
    accuracy); `run_protocol(reach_tolerance=...)` overrides it.
  """

  name: str
  make_model: Callable[[str], Any]
  data: Callable[[], tuple[dict, dict, dict]]
  epochs: int
  batch_size: int
  config: training.TrainConfig
  loss_fn: training.LossFn = training.cross_entropy_loss
  metric: str = "accuracy"
  higher_is_better: bool = True
  select_on: str = "accuracy"
  ceiling_blueprint: str | tuple[str, ...] = ("parallel_mlp", "residual_mlp")
  epoch_rows: int | None = None  # rows per epoch (a fixed slice per RNG seed); None: all
  eval_batch: int = 4096
  tokens_per_row: int = 1
  reach_tolerance: float = 0.0


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float):
  return optax.adam(learning_rate)


@dataclasses.dataclass
class RunResult:
  """One run of one variant at one learning rate and RNG seed."""

  variant: str
  seed: int
  lr: float
  val_metric: float  # the task's metric on the validation split, final epoch
  val_loss: float
  params: int  # parameters the final model uses (host + active children)
  train_flops: float  # forward + backward of the live parameters, summed over steps
  wall_time: float
  history: list
  fossilized: int
  test_metric: float = float("nan")  # filled by `select_and_test`, for the chosen rate only
  test_loss: float = float("nan")
  variables: bytes | None = None  # the final params and seed states (flax msgpack)
  # Per epoch end: cumulative training FLOPs (`flops_curve`) and the task's metric on the
  # validation split (`validation_curve`), the pair the compute comparison reads.
  flops_curve: list = dataclasses.field(default_factory=list)
  val_curve: list = dataclasses.field(default_factory=list)

  def summary(self, task: str) -> str:
    """One progress line for this run (validation only: the test split is not read yet)."""
    return (f"{task} seed {self.seed} {self.variant:12s} lr {self.lr:.0e}  "
            f"val {self.val_metric:.4f}  val loss {self.val_loss:.4f}  "
            f"params {self.params:7d}  fossilized {self.fossilized}  {self.wall_time:6.1f}s")


def _epoch_data(task: Task, train: dict, seed: int) -> dict:
  if task.epoch_rows is None:
    return train
  n = len(next(iter(train.values())))
  idx = np.random.default_rng([seed, 7]).permutation(n)[: task.epoch_rows]
  return {k: v[idx] for k, v in train.items()}


def flops_curve(history: Sequence[dict], initial_params: int, steps_per_epoch: int,
                batch_size: int, tokens_per_row: int = 1) -> np.ndarray:
  """Cumulative training FLOPs at each epoch end of `history` (one entry per epoch).

  The convention (Kaplan et al., "Scaling laws for neural language models"): a parameter
  costs 2 FLOPs a token forward and 4 backward, so a step costs
  `6 × live params × rows × tokens_per_row`. The live count is the model's (host plus active
  children, `training.param_counts`); each epoch's is the one it started with, since stages
  change only at epoch ends. Not counted: attention's context term (the `QKᵀ` and `AV`
  products, which grow with the context rather than the parameters), the validation and
  counterfactual passes, and that an embedding lookup costs no multiply (its parameters are
  counted like any other). Growth is compared with the same count on every variant, so what
  it leaves out shifts all of them alike.
  """
  counts = ([initial_params] + [int(h["params"]) for h in history[:-1]])[:len(history)]
  per_epoch = [6.0 * c * steps_per_epoch * batch_size * tokens_per_row for c in counts]
  return np.cumsum(np.asarray(per_epoch, np.float64))


def train_flops(history: Sequence[dict], initial_params: int, steps_per_epoch: int,
                batch_size: int, tokens_per_row: int = 1) -> float:
  """A run's total training FLOPs: the last point of `flops_curve` (its convention)."""
  curve = flops_curve(history, initial_params, steps_per_epoch, batch_size, tokens_per_row)
  return float(curve[-1]) if len(curve) else 0.0


def validation_curve(history: Sequence[dict], metric: str) -> np.ndarray:
  """The validation `metric` ("loss", "accuracy", ...) at each epoch end of `history`.

  NaN at an epoch ended by an emergency rollback: the model that scored it was thrown away
  (the run goes on from its last good state), so it reached nothing the run kept."""
  return np.asarray([float("nan") if h.get("rolled_back") else
                     float(h.get(f"val_{metric}", h["val_loss"])) for h in history],
                    np.float64)


def reaches(value: float, target: float, *, higher_is_better: bool,
            tolerance: float = 0.0) -> bool:
  """Whether a validation figure is as good as `target`, `tolerance` short of it allowed
  (NaN never reaches)."""
  if not (math.isfinite(value) and math.isfinite(target)):
    return False
  if higher_is_better:
    return value >= target - tolerance
  return value <= target + tolerance


def flops_to_reach(flops: Sequence[float], val: Sequence[float], target: float, *,
                   higher_is_better: bool, tolerance: float = 0.0) -> float | None:
  """The cumulative training FLOPs at the first epoch end whose validation figure reaches
  `target` (see `reaches`); None if no epoch end does. `flops` and `val` are a run's
  `flops_curve` and `validation_curve`, epoch by epoch."""
  if len(flops) != len(val):
    raise ValueError(f"flops, val: expected one value per epoch in each, got {len(flops)} "
                     f"and {len(val)}")
  for f, v in zip(flops, val):
    if reaches(float(v), target, higher_is_better=higher_is_better, tolerance=tolerance):
      return float(f)
  return None


def reach_summary(runs: Sequence[RunResult], *, higher_is_better: bool,
                  tolerance: float = 0.0) -> dict:
  """What each variant spent to reach fixed-large's final validation figure.

  `runs`: every variant's runs at its chosen rate (`select_and_test`'s picked runs). The
  target is the mean over fixed-large's runs of their final validation figure (the task's
  metric), the same number as its report row's `val_mean`. Returns `{"target", "tolerance",
  "threshold", "fixed_large_flops", "variants"}`, where `variants[v]` holds `seeds`,
  `reached` (how many of them reached it), `runs` (per run in seed order: the FLOPs, None
  for never), `flops` (the median over the runs that reached it; None if none did) and
  `fraction` (`flops` over fixed-large's mean training FLOPs). Without fixed-large runs there
  is no target: `{}`.

  Fixed-large is in the table too: its seeds scatter around their own mean, so a tolerance
  of 0 leaves about half of them short of it, which says how sharp the target is.
  """
  large = [r for r in runs if r.variant == "fixed_large"]
  if not large:
    return {}
  target = float(np.mean([r.val_metric for r in large]))
  large_flops = float(np.mean([r.train_flops for r in large]))
  out = {"target": target, "tolerance": float(tolerance),
         "threshold": target - tolerance if higher_is_better else target + tolerance,
         "fixed_large_flops": large_flops, "variants": {}}
  for variant in VARIANTS:
    rs = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
    if not rs:
      continue
    spent = [flops_to_reach(r.flops_curve, r.val_curve, target,
                            higher_is_better=higher_is_better, tolerance=tolerance)
             for r in rs]
    reached = [f for f in spent if f is not None]
    median = float(np.median(reached)) if reached else None
    out["variants"][variant] = {
        "seeds": len(rs), "reached": len(reached), "runs": spent, "flops": median,
        "fraction": (median / large_flops if median is not None and large_flops > 0
                     else None)}
  return out


def _tree_bytes(tree) -> bytes:
  """A pytree's leaves as bytes (numpy's npz); the structure comes back from a template."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, *[np.asarray(x) for x in jax.tree.leaves(tree)])
  return buf.getvalue()


def _tree_from_bytes(template, data: bytes):
  """Inverse of `_tree_bytes` for a tree of `template`'s structure (shapes checked)."""
  import io  # pylint: disable=g-import-not-at-top
  with np.load(io.BytesIO(data)) as npz:
    leaves = [npz[f"arr_{i}"] for i in range(len(npz.files))]
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  if len(flat) != len(leaves):
    raise ValueError(f"variables: {len(leaves)} saved leaves, but the model has {len(flat)}")
  for (path, ref), saved in zip(flat, leaves):
    if np.shape(ref) != np.shape(saved):
      # E.g. a vocabulary that differs between machines: the char LM's corpus is the
      # running Python's standard library.
      raise ValueError(f"variables: the saved leaf {jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(saved)}, the model's {np.shape(ref)}")
  return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])


def grown_log_path(log_dir: str, learning_rate: float, seed: int) -> str:
  """Where the grown run of (`learning_rate`, `seed`) writes its event log."""
  return os.path.join(log_dir, f"grown_lr{float(learning_rate):g}_seed{seed}.jsonl")


def run_variant(task: Task, variant: str, *, seed: int, learning_rate: float,
                log_dir: str | None = None, progress: bool = False,
                policy: Callable | None = None) -> RunResult:
  """Trains one variant on the task's training split; decisions see only its validation
  split. The final variables are kept (serialized) for `select_and_test`."""
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
  train, val, _ = task.data()
  train = _epoch_data(task, train, seed)
  model = task.make_model(variant)
  key = jax.random.key(seed)
  state = training.create_train_state(model, _adam(float(learning_rate)),
                                      jnp.asarray(train["x"][:2]), key, task.config)
  if variant == "ceiling":
    state = children_from_start(state, task.ceiling_blueprint, jax.random.fold_in(key, 7))
  if policy is None:
    policy = tamiyo.decide if variant == "grown" else no_growth
  log_path = (grown_log_path(log_dir, learning_rate, seed)
              if (log_dir and variant == "grown") else None)
  initial = training.param_counts(state)["model"]
  start = time.perf_counter()
  state, history = training.fit(state, train, val, task.loss_fn, epochs=task.epochs,
                                batch_size=task.batch_size, policy=policy, seed=seed,
                                log_path=log_path, progress=progress,
                                description=f"{task.name} {variant} seed {seed}")
  wall = time.perf_counter() - start
  last = history[-1]
  fossilized = sum(int(np.sum(np.asarray(v.seeds.stage) == lifecycle.Stage.FOSSILIZED))
                   for v in knn.find_layers(state.kasmina).values())
  n = len(next(iter(train.values())))
  steps_per_epoch = n // task.batch_size
  variables = _tree_bytes({"params": state.params, knn.KASMINA: state.kasmina})
  flops = flops_curve(history, initial, steps_per_epoch, task.batch_size, task.tokens_per_row)
  return RunResult(
      variant=variant, seed=seed, lr=float(learning_rate),
      val_metric=float(last.get(f"val_{task.metric}", last["val_loss"])),
      val_loss=float(last["val_loss"]), params=int(last["params"]),
      train_flops=float(flops[-1]), wall_time=wall, history=history, fossilized=fossilized,
      variables=variables, flops_curve=flops.tolist(),
      val_curve=validation_curve(history, task.metric).tolist())


def restore_state(task: Task, variant: str, variables: bytes, *, learning_rate: float,
                  seed: int = 0) -> training.TrainState:
  """A `TrainState` holding a run's final params and seed states (e.g. for `export`)."""
  train, _, _ = task.data()
  state = training.create_train_state(task.make_model(variant), _adam(float(learning_rate)),
                                      jnp.asarray(train["x"][:2]), jax.random.key(seed),
                                      task.config)
  restored = _tree_from_bytes({"params": state.params, knn.KASMINA: state.kasmina}, variables)
  return state.replace(params=restored["params"], kasmina=restored[knn.KASMINA])


def evaluate_variables(task: Task, variant: str, variables: bytes, data: dict) -> dict:
  """The task's loss and metrics of a run's final model on `data` (evaluation pass, seeds
  as they are), in batches of `task.eval_batch` rows, weighted by rows."""
  model = task.make_model(variant)
  x0 = jnp.asarray(data["x"][:2])
  template = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x0)
  template = {"params": template["params"], knn.KASMINA: template[knn.KASMINA]}
  restored = _tree_from_bytes(template, variables)

  @jax.jit
  def batch_eval(v, batch):
    out = model.apply(v, batch["x"], train=False)
    return task.loss_fn(out, batch)

  n = len(data["x"])
  totals: dict[str, float] = {}
  for i in range(0, n, task.eval_batch):
    batch = {k: jnp.asarray(v[i:i + task.eval_batch]) for k, v in data.items()}
    rows = len(batch["x"])
    loss, metrics = batch_eval(restored, batch)
    for k, v in {"loss": loss, **metrics}.items():
      totals[k] = totals.get(k, 0.0) + float(v) * rows
  return {k: v / n for k, v in totals.items()}


# ----------------------------------------------------------------------------- the protocol


def _run_job(job):
  """One (task factory, variant, lr, seed) run; module-level so worker processes can run it."""
  factory, kwargs, variant, lr, seed, log_dir = job
  task = factory(**kwargs)
  return run_variant(task, variant, seed=seed, learning_rate=lr, log_dir=log_dir)


def sweep(task_factory: Callable[..., Task], task_kwargs: dict, *,
          variants: Sequence[str] = VARIANTS,
          lrs: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_LRS,
          seeds: int = 5, workers: int = 1, log_dir: str | None = None,
          on_result: Callable[[RunResult], None] | None = None) -> list[RunResult]:
  """Every (variant, lr, seed) run of a task. `task_factory(**task_kwargs)` builds the task
  (in each worker process too, so it must be a module-level function). `lrs` is one grid for
  every variant, or a `{variant: rates}` map (a grid per variant, e.g. narrowed by an earlier
  validation-only round). With `workers > 1` the runs go to that many processes. Only the
  grown run of the first rate and seed writes an event log (to `log_dir`). Validation only:
  the test split is not read here."""
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"variants: unknown variant {v!r}; expected some of {VARIANTS}")
  grids = variant_rates(variants, lrs)
  jobs = [(task_factory, task_kwargs, v, float(lr), s,
           log_dir if (s == 0 and v == "grown") else None)
          for s in range(seeds) for lr in sorted({r for g in grids.values() for r in g})
          for v in variants if lr in grids[v]]
  results = []
  if workers <= 1:
    for job in jobs:
      r = _run_job(job)
      results.append(r)
      if on_result is not None:
        on_result(r)
    return results
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("spawn")
  # Small models: one single-threaded process a run beats one run over many threads. The
  # workers inherit the environment at their start.
  saved = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = ((saved + " ") if saved else "") + (
      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  try:
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      futures = [pool.submit(_run_job, job) for job in jobs]
      for f in concurrent.futures.as_completed(futures):
        r = f.result()
        results.append(r)
        if on_result is not None:
          on_result(r)
  finally:
    if saved is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = saved
  return results


def variant_rates(variants: Sequence[str],
                  lrs: Sequence[float] | Mapping[str, Sequence[float]]
                  ) -> dict[str, tuple[float, ...]]:
  """`{variant: rates}` from one shared grid or a per-variant map (which must name every
  variant and no other); each grid non-empty and positive."""
  if isinstance(lrs, Mapping):
    extra = sorted(set(lrs) - set(variants))
    missing = [v for v in variants if v not in lrs]
    if extra or missing:
      raise ValueError(f"lrs: the rate map must name exactly the variants {list(variants)}; "
                       f"missing {missing}, unexpected {extra}")
    grids = {v: tuple(float(r) for r in lrs[v]) for v in variants}
  else:
    grids = {v: tuple(float(r) for r in lrs) for v in variants}
  for v, grid in grids.items():
    if not grid:
      raise ValueError(f"lrs: expected at least one learning rate (variant {v!r})")
    if any(not (r > 0 and math.isfinite(r)) for r in grid):
      raise ValueError(f"lrs: expected positive finite learning rates, got {grid} for {v!r}")
  return grids


def _better(task: Task, a: float, b: float) -> bool:
  if task.select_on == "loss":
    return a < b
  return a > b


def select_rates(task: Task, results: Sequence[RunResult]) -> dict[str, float]:
  """Each variant's learning rate: the best mean over seeds of the validation `select_on`
  (ties: the smaller rate). Non-finite runs count as the worst value."""
  chosen = {}
  for variant in VARIANTS:
    rs = [r for r in results if r.variant == variant]
    if not rs:
      continue
    best_lr, best = None, None
    for lr in sorted({r.lr for r in rs}):
      vals = [(r.val_loss if task.select_on == "loss" else r.val_metric)
              for r in rs if r.lr == lr]
      worst = np.inf if task.select_on == "loss" else -np.inf
      score = float(np.mean([v if np.isfinite(v) else worst for v in vals]))
      if best is None or _better(task, score, best):
        best_lr, best = lr, score
    chosen[variant] = best_lr
  return chosen


def select_and_test(task: Task, results: Sequence[RunResult], *, read_test: bool = True
                    ) -> tuple[dict, list[RunResult]]:
  """Chooses each variant's rate on validation, then reads the test split once for each run
  of the chosen rate. Returns `(chosen rates, the chosen runs with test figures)`. With
  `read_test=False` (tuning settings on validation) the test split is not read at all."""
  chosen = select_rates(task, results)
  test = task.data()[2] if read_test else None
  picked = []
  for r in results:
    if chosen.get(r.variant) != r.lr:
      continue
    if test is None:
      picked.append(r)
      continue
    m = evaluate_variables(task, r.variant, r.variables, test)
    r.test_metric = float(m.get(task.metric, m["loss"]))
    r.test_loss = float(m["loss"])
    picked.append(r)
  return chosen, picked


def _mean_std(xs) -> tuple[float, float]:
  xs = np.asarray(xs, np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def report_rows(task: Task, results: Sequence[RunResult], chosen: dict,
                picked: Sequence[RunResult], *, reach_tolerance: float | None = None
                ) -> list[dict]:
  """One row per variant at its chosen rate: `variant`, `lr`, `seeds`, `test_mean`,
  `test_std`, `val_mean`, `val_std`, `params`, `train_flops`, `wall_time`, `fossilized`,
  `val_by_lr` (the sweep: mean validation metric per rate), and what the variant spent to
  reach fixed-large's final validation figure (`reach_summary`; `reach_tolerance` None: the
  task's): `reach_target`, `reach_tolerance`, `reach_threshold` (the same in every row),
  `reached_large` (runs that reached it), `flops_to_large_runs` (per run, None for never),
  `flops_to_large` (median over the runs that reached it) and `flops_to_large_fraction` (of
  fixed-large's training FLOPs); None where no run reached it or fixed-large was not run."""
  tolerance = task.reach_tolerance if reach_tolerance is None else float(reach_tolerance)
  reach = reach_summary(picked, higher_is_better=task.higher_is_better, tolerance=tolerance)
  rows = []
  for variant in VARIANTS:
    rs = [r for r in picked if r.variant == variant]
    if not rs:
      continue
    test_mean, test_std = _mean_std([r.test_metric for r in rs])
    test_loss, test_loss_std = _mean_std([r.test_loss for r in rs])
    val_mean, val_std = _mean_std([r.val_metric for r in rs])
    val_loss, val_loss_std = _mean_std([r.val_loss for r in rs])
    sweep_rows = {}
    for lr in sorted({r.lr for r in results if r.variant == variant}):
      at = [r for r in results if r.variant == variant and r.lr == lr]
      sweep_rows[f"{lr:g}"] = {"val_mean": _mean_std([r.val_metric for r in at])[0],
                               "val_loss": _mean_std([r.val_loss for r in at])[0]}
    reached = reach.get("variants", {}).get(variant, {})
    rows.append({
        "variant": variant, "lr": chosen[variant], "seeds": len(rs),
        "test_mean": test_mean, "test_std": test_std,
        "test_loss_mean": test_loss, "test_loss_std": test_loss_std,
        "val_mean": val_mean, "val_std": val_std,
        "val_loss_mean": val_loss, "val_loss_std": val_loss_std,
        "params": float(np.mean([r.params for r in rs])),
        "params_std": float(np.std([r.params for r in rs])),
        "train_flops": float(np.mean([r.train_flops for r in rs])),
        "wall_time": float(np.mean([r.wall_time for r in rs])),
        "fossilized": float(np.mean([r.fossilized for r in rs])),
        "val_by_lr": sweep_rows,
        "reach_target": reach.get("target"), "reach_tolerance": reach.get("tolerance"),
        "reach_threshold": reach.get("threshold"),
        "reached_large": reached.get("reached"), "flops_to_large_runs": reached.get("runs"),
        "flops_to_large": reached.get("flops"),
        "flops_to_large_fraction": reached.get("fraction"),
    })
  return rows


def _reach_cell(row: dict) -> str:
  """A row's FLOPs to fixed-large's figure: `4.1e+10 (52%, 4/5 seeds)`, `never (0/5 seeds)`,
  or `—` where there is no target (fixed-large not run, or a row from before the column)."""
  if row.get("reach_target") is None or row.get("reached_large") is None:
    return "—"
  seeds = f"{row['reached_large']}/{row['seeds']} seeds"
  if row.get("flops_to_large") is None:
    return f"never ({seeds})"
  fraction = row.get("flops_to_large_fraction")
  share = f"{100 * fraction:.0f}%, " if fraction is not None else ""
  return f"{row['flops_to_large']:.3g} ({share}{seeds})"


def markdown_table(rows: Sequence[dict], metric: str = "accuracy") -> str:
  """The report's table: test metric (mean ± std over seeds) at each variant's chosen rate,
  and the training FLOPs each variant spent to first reach fixed-large's final validation
  figure (the median over the seeds that reached it, its share of fixed-large's FLOPs, how
  many seeds reached it; "never" where none did). The header gives the figure to reach:
  fixed-large's mean final validation metric, less (or, for a loss, plus) the tolerance."""
  pct = metric == "accuracy"
  fmt = (lambda m, s: f"{100 * m:.2f}% ± {100 * s:.2f}") if pct else (
      lambda m, s: f"{m:.4f} ± {s:.4f}")
  threshold = next((r["reach_threshold"] for r in rows
                    if r.get("reach_threshold") is not None), None)
  if threshold is None:
    goal = ""
  else:
    goal = f" {100 * threshold:.2f}%" if pct else f" {threshold:.4f}"
  lines = [f"| variant | lr (chosen on val) | seeds | test {metric} | val {metric} | "
           "params | training FLOPs | wall time (s) | fossilized | "
           f"FLOPs to fixed-large's val {metric}{goal} |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['lr']:g} | {r['seeds']} | {fmt(r['test_mean'], r['test_std'])} "
        f"| {fmt(r['val_mean'], r['val_std'])} | {r['params']:.0f} | {r['train_flops']:.3g} "
        f"| {r['wall_time']:.1f} | {r['fossilized']:.1f} | {_reach_cell(r)} |")
  return "\n".join(lines)


def verdict(rows: Sequence[dict], *, higher_is_better: bool = True) -> dict:
  """Grown against the others, in the report's terms: differences of test means and how
  many (larger) standard deviations separate them; and, the measure growth is judged by,
  the training FLOPs grown spent to first reach fixed-large's final validation figure
  (`grown_flops_to_large`, None for never), as a share of fixed-large's
  (`grown_flops_to_large_fraction`), with how many seeds reached it (`grown_reached_large`
  of `grown_seeds`) and its whole run's share (`grown_train_flops_fraction`)."""
  by = {r["variant"]: r for r in rows}
  if "grown" not in by:
    return {}
  g = by["grown"]
  sign = 1.0 if higher_is_better else -1.0
  out = {"grown_params": g["params"], "grown_train_flops": g["train_flops"]}
  for other in ("fixed_small", "fixed_large", "ceiling"):
    if other in by:
      o = by[other]
      diff = sign * (g["test_mean"] - o["test_mean"])
      out[f"vs_{other}"] = diff
      spread = max(g["test_std"], o["test_std"])
      out[f"vs_{other}_stds"] = diff / spread if spread > 0 else float("nan")
      out[f"{other}_params"] = o["params"]
      out[f"{other}_train_flops"] = o["train_flops"]
  if "fixed_large" in by and g.get("reach_target") is not None:
    large = by["fixed_large"]
    out.update({
        "reach_target": g["reach_target"], "reach_tolerance": g["reach_tolerance"],
        "grown_seeds": g["seeds"], "grown_reached_large": g["reached_large"],
        "grown_flops_to_large": g["flops_to_large"],
        "grown_flops_to_large_fraction": g["flops_to_large_fraction"],
        "grown_train_flops_fraction": (g["train_flops"] / large["train_flops"]
                                       if large["train_flops"] > 0 else float("nan"))})
  return out


def run_protocol(task_factory: Callable[..., Task], task_kwargs: dict, *,
                 variants: Sequence[str] = VARIANTS,
                 lrs: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_LRS,
                 seeds: int = 5, workers: int = 1, log_dir: str | None = None,
                 verbose: bool = True, read_test: bool = True,
                 reach_tolerance: float | None = None) -> dict:
  """The whole protocol for one task: sweep, choose on validation, test once, summarise.
  Returns `{"task", "metric", "higher_is_better", "rows", "verdict", "chosen", "reach",
  "runs", ...}` (JSON-ready but for `results`, the RunResult objects). `reach` is
  `reach_summary` of the chosen runs (`reach_tolerance` None: the task's); each entry of
  `runs` carries its `flops_curve` and `val_curve`, epoch by epoch, beside its history."""
  task = task_factory(**task_kwargs)
  start = time.perf_counter()
  results = sweep(task_factory, task_kwargs, variants=variants, lrs=lrs, seeds=seeds,
                  workers=workers, log_dir=log_dir,
                  on_result=(lambda r: print(r.summary(task.name), flush=True))
                  if verbose else None)
  return summarize_protocol(task, results, log_dir=log_dir, read_test=read_test,
                            reach_tolerance=reach_tolerance,
                            wall_time=time.perf_counter() - start)


def summarize_protocol(task: Task, results: Sequence[RunResult], *,
                       log_dir: str | None = None, read_test: bool = True,
                       reach_tolerance: float | None = None,
                       wall_time: float | None = None) -> dict:
  """The protocol after its sweep: choose on validation, test once, summarise (what
  `run_protocol` returns). `results` may come from several `sweep` calls (e.g. one rate per
  machine session, saved with `save_results`): each (variant, rate, seed) at most once."""
  results = list(results)
  keys = [(r.variant, r.lr, r.seed) for r in results]
  if len(set(keys)) != len(keys):
    dup = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"results: (variant, lr, seed) runs given more than once: {dup}")
  chosen, picked = select_and_test(task, results, read_test=read_test)
  tolerance = task.reach_tolerance if reach_tolerance is None else float(reach_tolerance)
  rows = report_rows(task, results, chosen, picked, reach_tolerance=tolerance)
  grown_log = None
  if log_dir and "grown" in chosen:
    path = grown_log_path(log_dir, chosen["grown"], 0)
    grown_log = path if os.path.exists(path) else None
  return {
      "task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
      "rows": rows, "verdict": verdict(rows, higher_is_better=task.higher_is_better),
      "chosen": chosen,
      "wall_time": (float(wall_time) if wall_time is not None
                    else float(sum(r.wall_time for r in results))),
      "grown_log": grown_log,
      "reach": reach_summary(picked, higher_is_better=task.higher_is_better,
                             tolerance=tolerance),
      "results": results,  # the RunResult objects (not JSON; callers drop this key)
      "runs": [{"variant": r.variant, "seed": r.seed, "lr": r.lr, "val_metric": r.val_metric,
                "val_loss": r.val_loss, "test_metric": r.test_metric, "test_loss": r.test_loss,
                "params": r.params, "train_flops": r.train_flops, "fossilized": r.fossilized,
                "wall_time": r.wall_time, "flops_curve": r.flops_curve,
                "val_curve": r.val_curve, "history": r.history} for r in results],
  }


def save_results(results: Sequence[RunResult], path: str) -> None:
  """Writes sweep results (final variables included, test never read) to `path` (pickle)."""
  import pickle  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as fh:
    pickle.dump([dataclasses.asdict(r) for r in results], fh, protocol=4)


def load_results(path: str) -> list[RunResult]:
  """The sweep results that `save_results` wrote."""
  import pickle  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as fh:
    rows = pickle.load(fh)
  return [RunResult(**row) for row in rows]


def write_report(result: dict, out_dir: str, *, args: dict | None = None,
                 metric: str = "accuracy", title: str | None = None,
                 plots: bool = True) -> list[str]:
  """Writes a `run_protocol` result to `out_dir`: `results.md` (the table, also printed),
  `results.json` (the settings `args` and the result; the RunResult objects left out) and,
  with `plots`, the test metric against parameters (`{metric}_vs_params.png`), the
  validation metric against training FLOPs (`val_{metric}_vs_flops.png`, the figure growth
  is judged by) and the grown run's lifecycle pictures. Returns the paths written."""
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  table = markdown_table(result["rows"], metric)
  print(table)
  paths = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.json")]
  with open(paths[0], "w") as fh:
    fh.write(table + "\n")
  with open(paths[1], "w") as fh:
    json.dump({"args": args or {}, **{k: v for k, v in result.items() if k != "results"}},
              fh, indent=1)
  if plots:
    from kasmina_jax import plots as plots_lib  # pylint: disable=g-import-not-at-top
    paths.append(plots_lib.plot_protocol(
        result["rows"], os.path.join(out_dir, f"{metric}_vs_params.png"), metric=metric,
        title=title or f"{result['task']}: test {metric} against parameters"))
    paths.append(plots_lib.plot_metric_vs_flops(
        result, os.path.join(out_dir, f"val_{metric}_vs_flops.png"), metric=metric))
    if result.get("grown_log"):
      paths += plots_lib.plot_run(result["grown_log"], out_dir)
    print("wrote:", *paths, sep="\n  ")
  return paths

"""The jitted train step, the end-of-epoch transition and a small `fit` loop.

Per step (`train_step`, pure, jitted): task loss + the TRAINING seeds' objectives, one
optimizer update masked by stage (`kasmina_jax.optim`), telemetry accumulation (inside the
layers), per-seed alpha updates from the grafting strategies, host drift and gradient norms.

Per epoch (`epoch_transition`, pure, jitted): validation "as is", the per-seed validation
counterfactual `delta = val_loss(seed off) - val_loss(seed on)`, health reports,
`tick_epoch` -> `update_readiness` -> `policy` (default `tamiyo.decide`) -> `apply_commands`
-> `reinit_children` (+ optimizer reset) -> field reports -> `tamiyo.observe`.

The seeds' side of both lives in `orchestration` (framework-free, over the
`{layer path: LayerSlot}` map that `linen.layer_slots` builds); here are the Linen-shaped
passes around it. `model` is anything with Linen's `apply` contract: a Linen module, or
`kasmina_jax.nnx.NnxModel` (`kasmina_jax.nnx.create_train_state`), so one loop serves both.

`end_of_epoch` adds the Python shell around it: emergency rollback to the last good state,
the event log (`finish_epoch`). `fit` loops over epochs with a progress bar (`fit_loop`, which
`distributed.fit` shares).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from kasmina_jax import _checks
from kasmina_jax import grafting as graft_lib
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import optim
from kasmina_jax import orchestration as orch
from kasmina_jax import tamiyo

LossFn = Callable[[jax.Array, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static settings of the train step and the epoch transition.

  max_judged: seeds whose validation counterfactual is measured per epoch end (two masked
  passes each; the seeds in TRAINING, EVALUATING and FINE_TUNING are judged, lowest index
  first); counterfactual_batch: how many of those passes run at once under `vmap`.
  """

  grafting: graft_lib.GraftingConfig = graft_lib.GraftingConfig()
  tamiyo: tamiyo.TamiyoConfig = tamiyo.TamiyoConfig()
  max_judged: int = 8
  counterfactual_batch: int = 4

  def __post_init__(self):
    _checks.positive_int("max_judged", self.max_judged)
    _checks.positive_int("counterfactual_batch", self.counterfactual_batch)

  @property
  def lifecycle(self) -> lifecycle.LifecycleConfig:
    return self.tamiyo.lifecycle


@struct.dataclass
class EpochStats:
  """Running sums of the current epoch (reset at each epoch end)."""

  loss_sum: jax.Array
  steps: jax.Array
  nonfinite_steps: jax.Array
  grad_norm_sum: jax.Array
  drift: jax.Array
  metric_sums: dict


def _zero_stats(metric_names=()) -> EpochStats:
  z = jnp.zeros((), jnp.float32)
  return EpochStats(loss_sum=z, steps=z, nonfinite_steps=z, grad_norm_sum=z, drift=z,
                    metric_sums={k: z for k in metric_names})


@struct.dataclass
class TrainState:
  """Everything a run needs to continue; a pytree (checkpoint it whole)."""

  step: jax.Array
  epoch: jax.Array
  params: Any
  opt_state: Any
  kasmina: Any  # the `kasmina` collection: KasminaVars per layer
  ctrl: tamiyo.ControllerState
  rng: jax.Array
  host_snapshot: Any  # the params at the last drift window start (children included)
  stats: EpochStats
  model: Any = struct.field(pytree_node=False)  # the Linen module (hashable)
  tx: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
  config: TrainConfig = struct.field(pytree_node=False)

  @property
  def layers(self) -> dict[tuple, knn.KasminaVars]:
    return knn.find_layers(self.kasmina)


layer_name = orch.layer_name


def seeds_tree(kasmina) -> dict[str, lifecycle.SeedState]:
  """The seed states of every layer, keyed by layer name (Tamiyo's view)."""
  return {layer_name(p): v.seeds for p, v in knn.find_layers(kasmina).items()}


@functools.lru_cache(maxsize=64)
def _wrapped_optimizer(optimizer, max_grad_norm):
  # One wrapped transformation per optimizer object, so that states built from the same
  # optimizer share the jit cache of `train_step` (the transformation is a static field).
  return optim.kasmina_optimizer(optimizer, max_grad_norm=max_grad_norm)


def create_train_state(model, optimizer: optax.GradientTransformation, sample_x: jax.Array,
                       key: jax.Array, config: TrainConfig = TrainConfig(), *,
                       max_grad_norm: float | None = None,
                       metric_names: tuple[str, ...] = ("accuracy",)) -> TrainState:
  """Initialises a Linen model that contains Kasmina layers, wrapped in the stage mask."""
  init_key, rng = jax.random.split(key)
  # Jitted: eager init of a model with Kasmina layers compiles every small op on its own.
  variables = jax.jit(functools.partial(model.init, train=False))(init_key, sample_x)
  return new_train_state(model, variables["params"], variables.get(knn.KASMINA, {}), optimizer,
                         rng, config, max_grad_norm=max_grad_norm, metric_names=metric_names)


def new_train_state(model, params, kasmina, optimizer: optax.GradientTransformation,
                    rng: jax.Array, config: TrainConfig = TrainConfig(), *,
                    max_grad_norm: float | None = None,
                    metric_names: tuple[str, ...] = ("accuracy",)) -> TrainState:
  """A `TrainState` from initialised `params` and `kasmina` collection; `model` is anything
  with Linen's `apply(variables, x, train=..., mutable=[...])` (a Linen module, or
  `kasmina_jax.nnx.NnxModel` for an NNX model), so every shell trains through this module."""
  if not knn.find_layers(kasmina):
    raise ValueError("model: found no Kasmina layer (kasmina_jax.nn.KasminaLayer) in it")
  tx = _wrapped_optimizer(optimizer, max_grad_norm)
  seeds = seeds_tree(kasmina)
  nb = {layer_name(p): v.spec.num_blueprints for p, v in knn.find_layers(kasmina).items()}
  return TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), kasmina=kasmina,
      ctrl=tamiyo.init_controller(seeds, nb, config.tamiyo), rng=rng,
      host_snapshot=jax.tree.map(jnp.copy, params), stats=_zero_stats(metric_names),
      model=model, tx=tx,
      config=config)


# ------------------------------------------------------------------------------- norms, drift
# Framework-free; they live in `orchestration` (re-exported here for older callers).

_is_child = optim._is_child  # pylint: disable=protected-access
host_only = orch.host_only
host_grad_norm = orch.host_grad_norm
child_grad_norms = orch.child_grad_norms
host_drift = orch.host_drift
wrapped_host_path = orch.wrapped_host_path
layer_host_drift = orch.layer_host_drift


# --------------------------------------------------------------------------------- train step


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def train_step(state: TrainState, batch: dict, loss_fn: LossFn) -> tuple[TrainState, dict]:
  """One optimisation step. `batch["x"]` is the model input; `loss_fn(out, batch)` returns
  `(loss, metrics)`. Non-finite losses or host gradients skip the update (and count in the
  epoch statistics, which is what triggers Tamiyo's emergency rollback)."""
  kasmina = state.kasmina

  def objective(params):
    out, mutated = state.model.apply({"params": params, knn.KASMINA: kasmina}, batch["x"],
                                  train=True, mutable=[knn.KASMINA, knn.KASMINA_AUX])
    task, metrics = loss_fn(out, batch)
    summaries = mutated[knn.KASMINA_AUX]
    child = sum((knn.get_path(summaries, p)["step"].child_loss
                 for p in knn.find_layers(kasmina)), jnp.zeros((), jnp.float32))
    return task + child, (task, metrics, mutated)

  (total, (task, metrics, mutated)), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params)
  new_kasmina = mutated[knn.KASMINA]
  summaries = mutated[knn.KASMINA_AUX]
  host_norm = host_grad_norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(host_norm)
  fossil = state.config.lifecycle.fossil
  seed_map = knn.seed_states(kasmina)
  learn_mask = optim.learning_mask(state.params, seed_map, fossil=fossil)
  updates, opt_state = state.tx.update(
      grads, state.opt_state, state.params, learn_mask=learn_mask,
      host_partition=optim.host_partition_mask(state.params, seed_map, fossil=fossil))
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  params = keep(params, state.params)
  opt_state = keep(opt_state, state.opt_state)

  cfg = state.config
  drift = host_drift(params, state.host_snapshot)
  step = state.step + 1
  refresh = (step % cfg.grafting.fixed_steps) == 0
  snapshot = jax.tree.map(lambda p, s: jnp.where(refresh, p, s), params, state.host_snapshot)

  slots = knn.layer_slots(new_kasmina)
  slots = orch.step_update(
      slots, old_params=state.params, params=params, grads=grads,
      snapshot=state.host_snapshot,
      summaries={p: knn.get_path(summaries, p)["step"] for p in slots},
      host_norm=host_norm, grafting=cfg.grafting, fossil=fossil)
  new_kasmina = knn.with_slots(new_kasmina, slots)

  st = state.stats
  stats = st.replace(
      loss_sum=st.loss_sum + task.astype(jnp.float32), steps=st.steps + 1,
      nonfinite_steps=st.nonfinite_steps + (~finite).astype(jnp.float32),
      grad_norm_sum=st.grad_norm_sum + jnp.where(jnp.isfinite(host_norm), host_norm, 0.0),
      drift=jnp.where(jnp.isfinite(drift), drift, st.drift),
      metric_sums={k: v + jnp.asarray(metrics.get(k, 0.0), jnp.float32)
                   for k, v in st.metric_sums.items()})
  new_state = state.replace(step=step, params=params, opt_state=opt_state,
                            kasmina=new_kasmina, host_snapshot=snapshot, stats=stats)
  return new_state, {"loss": task, "total_loss": total, **metrics}


# ----------------------------------------------------------------------------- epoch end


@struct.dataclass
class EpochOutput:
  """What one epoch transition decided and measured (per layer dicts keyed by name)."""

  train_loss: jax.Array
  train_metrics: dict
  val_loss: jax.Array
  val_metrics: dict
  delta: dict  # (K,) validation counterfactual per seed, NaN where not judged
  report: tamiyo.EpochReport
  commands: dict
  accepted: dict
  old_stage: dict
  new_stage: dict
  field_reports: Any
  rollback_requested: jax.Array


def evaluate(state: TrainState, batch: dict, loss_fn: LossFn, eval_alpha=None):
  """Validation loss and metrics; `eval_alpha` a `kasmina_eval` tree (None: as is)."""
  variables = {"params": state.params, knn.KASMINA: state.kasmina}
  if eval_alpha is not None:
    variables[knn.KASMINA_EVAL] = eval_alpha
  out, mutated = state.model.apply(variables, batch["x"], train=False, mutable=[knn.KASMINA_AUX])
  loss, metrics = loss_fn(out, batch)
  return loss, metrics, mutated[knn.KASMINA_AUX]


JUDGED_STAGES = (lifecycle.Stage.TRAINING, lifecycle.Stage.EVALUATING,
                 lifecycle.Stage.FINE_TUNING)


def counterfactual_deltas(state: TrainState, batch: dict, loss_fn: LossFn) -> dict:
  """Per layer (K,) `val_loss(seed off) - val_loss(seed on)`, NaN where not judged.

  Every other seed stays as it is; "on" is `eval_alpha = 1`, also for a seed in TRAINING.
  """
  layers = knn.find_layers(state.kasmina)
  paths = list(layers)
  sizes = [layers[p].spec.num_seeds for p in paths]
  offsets = np.cumsum([0] + sizes)
  total = int(offsets[-1])
  stage_flat = jnp.concatenate([layers[p].seeds.stage for p in paths])
  judged = lifecycle.stage_in(stage_flat, JUDGED_STAGES)
  m = min(state.config.max_judged, total)
  (idx,) = jnp.nonzero(judged, size=m, fill_value=-1)
  base = {p: knn.current_eval_alpha(layers[p].seeds) for p in paths}

  def tree_for(flat_index, value):
    def fn(path, v):
      i = paths.index(path)
      local = flat_index - offsets[i]
      hit = (local >= 0) & (local < sizes[i])
      k = jnp.arange(sizes[i])
      return jnp.where(hit & (k == local), value, base[path])
    return knn.eval_alpha_tree(state.kasmina, fn)

  def loss_for(args):
    flat_index, value = args
    loss, _, _ = evaluate(state, batch, loss_fn, tree_for(flat_index, value))
    return loss

  idx2 = jnp.concatenate([idx, idx])
  vals = jnp.concatenate([jnp.zeros((m,)), jnp.ones((m,))])
  losses = jax.lax.map(loss_for, (idx2, vals), batch_size=state.config.counterfactual_batch)
  delta_m = losses[:m] - losses[m:]
  delta_flat = jnp.full((total,), jnp.nan, jnp.float32)
  delta_flat = delta_flat.at[jnp.where(idx >= 0, idx, total)].set(delta_m, mode="drop")
  return {layer_name(p): delta_flat[offsets[i]:offsets[i + 1]] for i, p in enumerate(paths)}


@functools.partial(jax.jit, static_argnames=("loss_fn", "policy"))
def epoch_transition(state: TrainState, val_batch: dict, loss_fn: LossFn,
                     policy: Callable = tamiyo.decide) -> tuple[TrainState, EpochOutput]:
  """The pure end-of-epoch function (see the module docstring)."""
  cfg = state.config
  layers = knn.find_layers(state.kasmina)
  names = {p: layer_name(p) for p in layers}
  steps = jnp.maximum(state.stats.steps, 1.0)
  train_loss = state.stats.loss_sum / steps
  train_loss = jnp.where(state.stats.nonfinite_steps > 0, jnp.nan, train_loss)
  train_metrics = {k: v / steps for k, v in state.stats.metric_sums.items()}
  val_loss, val_metrics, summaries = evaluate(state, val_batch, loss_fn)
  deltas = counterfactual_deltas(state, val_batch, loss_fn)

  slots = knn.layer_slots(state.kasmina)
  old = seeds_tree(state.kasmina)
  recon = {names[p]: knn.get_path(summaries, p)["step"].recon_ratio for p in layers}
  key, rng = jax.random.split(state.rng)
  end = orch.epoch_end(
      slots, state.params, state.opt_state, state.ctrl, deltas=deltas, recon_ratio=recon,
      train_loss=train_loss, val_loss=val_loss,
      host_grad_norm_mean=state.stats.grad_norm_sum / steps, host_drift_value=state.stats.drift,
      epoch=state.epoch, key=key, config=cfg.tamiyo, policy=policy)
  params, opt_state, ctrl = end.params, end.opt_state, end.ctrl
  kasmina = knn.with_slots(state.kasmina, end.slots)
  report, commands, accepted, new_seeds, fr = (end.report, end.commands, end.accepted,
                                               end.new_seeds, end.field_reports)
  new_state = state.replace(
      epoch=state.epoch + 1, params=params, opt_state=opt_state, kasmina=kasmina, ctrl=ctrl,
      rng=rng, stats=_zero_stats(tuple(state.stats.metric_sums)))
  out = EpochOutput(
      train_loss=train_loss, train_metrics=train_metrics, val_loss=val_loss,
      val_metrics=val_metrics, delta=deltas, report=report, commands=commands,
      accepted=accepted, old_stage={k: v.stage for k, v in old.items()},
      new_stage={k: v.stage for k, v in new_seeds.items()}, field_reports=fr,
      rollback_requested=ctrl.rollback_requested)
  return new_state, out


@jax.jit
def apply_rollback(state: TrainState, ctrl: tamiyo.ControllerState) -> tuple[TrainState, Any]:
  """After restoring the last good state: in-flight seeds become ROLLED_BACK (GERMINATED ones
  CANCELLED), their children are zeroed, and `ctrl` (the controller's memory from the epoch
  that failed) is kept with its rollback request cleared. Returns `(state, field_reports)`."""
  slots, params, opt_state, ctrl, fr = orch.rollback(
      knn.layer_slots(state.kasmina), state.params, state.opt_state, ctrl,
      config=state.config.tamiyo, epoch=state.epoch, key=state.rng)
  kasmina = knn.with_slots(state.kasmina, slots)
  return state.replace(params=params, opt_state=opt_state, kasmina=kasmina, ctrl=ctrl), fr


@jax.jit
def rollback_in_place(state: TrainState, field_reports) -> tuple[TrainState, Any]:
  """An emergency rollback with no checkpoint to restore (`epoch_transition`'s output).

  The epoch's commands already rolled back the in-flight seeds (GERMINATED ones cancelled)
  and zeroed their children, and `field_reports` (the epoch's) describe them; the transition
  left them out of the statistics because a restore normally reports the restored seeds
  (`apply_rollback`). Here nothing is restored, so they are the rollback's reports: they are
  fed to `tamiyo.observe`. Seeds a custom policy left in flight are rolled back as after a
  restore (`apply_rollback`, which also clears the rollback request); their reports join.
  Returns `(state, reports)`.
  """
  ctrl = tamiyo.observe(state.ctrl, field_reports, state.config.tamiyo)
  state, late = apply_rollback(state, ctrl)

  def merge(epoch_fr, late_fr):
    def leaf(a, b):
      valid = epoch_fr.valid.reshape(epoch_fr.valid.shape + (1,) * (a.ndim - 1))
      return jnp.where(valid, a, b)
    return jax.tree.map(leaf, epoch_fr, late_fr)

  is_fr = lambda x: isinstance(x, tamiyo.FieldReports)
  return state, jax.tree.map(merge, field_reports, late, is_leaf=is_fr)


def param_counts(state: TrainState) -> dict[str, int]:
  """Host parameters, allocated child parameters, and active child parameters."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  children = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.tree.map(lambda c: c if _is_child(c) else None, state.params, is_leaf=_is_child)))
  active = 0
  for lv in knn.find_layers(state.kasmina).values():
    live = np.asarray(lifecycle.stage_in(lv.seeds.stage, lifecycle.ACTIVE_STAGES))
    b = np.clip(np.asarray(lv.seeds.blueprint), 0, lv.spec.num_blueprints - 1)
    active += int(np.sum(np.where(live, lv.spec.catalog.param_count[b], 0)))
  return {"host": total - children, "allocated": children, "active": active,
          "model": total - children + active}


def _stage_names(stages) -> list[str]:
  return [lifecycle.Stage(int(s)).name for s in np.asarray(stages)]


def log_epoch(log, state: TrainState, out: EpochOutput, rolled_back: bool, fr_extra=None):
  """Writes an epoch's events (epoch summary, transitions, field reports) to an EventLog."""
  epoch, step = int(out.report.epoch), int(state.step)
  layers = {layer_name(p): lv for p, lv in knn.find_layers(state.kasmina).items()}
  counts = param_counts(state)
  log.epoch(
      epoch=epoch, step=step, train_loss=float(out.train_loss), val_loss=float(out.val_loss),
      val_metric=float(out.val_metrics.get("accuracy", np.nan)) if out.val_metrics else None,
      params_active=counts["model"], params_allocated=counts["host"] + counts["allocated"],
      stages={k: np.asarray(v.seeds.stage).tolist() for k, v in layers.items()},
      health={k: {f: np.asarray(getattr(r.health, f)).tolist()
                  for f in tamiyo.HEALTH_FIELDS}
              for k, r in out.report.layers.items()},
      alpha={k: np.asarray(v.seeds.alpha).tolist() for k, v in layers.items()},
      extra={"rolled_back": rolled_back,
             "delta": {k: np.asarray(v).tolist() for k, v in out.delta.items()},
             **{f"train_{k}": float(v) for k, v in out.train_metrics.items()}})
  for name in out.old_stage:
    old, new = np.asarray(out.old_stage[name]), np.asarray(out.new_stage[name])
    lv = layers[name]
    for k in np.nonzero(old != new)[0]:
      b = int(np.asarray(lv.seeds.blueprint)[k])
      log.transition(epoch=epoch, step=step, layer=name, seed=int(k),
                     from_stage=lifecycle.Stage(int(old[k])).name,
                     to_stage=lifecycle.Stage(int(new[k])).name,
                     blueprint=lv.spec.catalog.names[b] if b >= 0 else None)
  for fr in ([fr_extra] if rolled_back and fr_extra is not None else [out.field_reports]):
    for rec in field_report_records(state, fr):
      log.field_report(rec)


def field_report_records(state: TrainState, fr) -> list[dict]:
  layers = {layer_name(p): lv for p, lv in knn.find_layers(state.kasmina).items()}
  return tamiyo.to_records(
      fr, layer_names=list(layers),
      blueprint_names={k: lv.spec.catalog.names for k, lv in layers.items()},
      strategy_names=graft_lib.STRATEGY_NAMES)


def end_of_epoch(state: TrainState, val_batch: dict, loss_fn: LossFn, *,
                 policy: Callable = tamiyo.decide, last_good=None, log=None):
  """The epoch end with its Python shell: transition, emergency rollback, event log.

  `last_good` is a `checkpoint.InMemoryCheckpoint` (or anything with `save`, `restore` and
  `has_value`): saved at every epoch end that passes the rollback test, restored on rollback.
  Without one (None, or nothing saved yet) a rollback restores nothing but still ends the
  in-flight seeds (`rollback_in_place`). Either way, on a rollback `out.field_reports` holds
  the rolled-back seeds' reports (the ones logged and counted by `tamiyo.observe`).
  Returns `(state, out, rolled_back)`.
  """
  new_state, out = epoch_transition(state, val_batch, loss_fn, policy)
  return finish_epoch(new_state, out, restore=apply_rollback, last_good=last_good, log=log)


def finish_epoch(new_state: TrainState, out: EpochOutput, *, restore: Callable = apply_rollback,
                 last_good=None, log=None):
  """`end_of_epoch` after the transition: the emergency rollback (`restore(base, ctrl)` on
  the last good state, e.g. `apply_rollback` or a placed, compiled twin of it; or
  `rollback_in_place` with nothing to restore), the last good state's save and the event
  log. Shared by every loop (`distributed` passes its mesh-placed rollback).
  Returns `(state, out, rolled_back)`."""
  # A replicated scalar under a mesh: every process takes the same branch.
  rolled_back = bool(out.rollback_requested)
  fr_extra = None
  if rolled_back:
    if last_good is not None and last_good.has_value:
      base = last_good.restore()
      base = base.replace(epoch=new_state.epoch, rng=new_state.rng, stats=new_state.stats)
      new_state, fr_extra = restore(base, new_state.ctrl)
    else:
      new_state, fr_extra = rollback_in_place(new_state, out.field_reports)
    out = out.replace(field_reports=fr_extra)
  if last_good is not None and not rolled_back:
    last_good.save(new_state)
  if log is not None:
    log_epoch(log, new_state, out, rolled_back, fr_extra)
  return new_state, out, rolled_back


def _batches(data: dict, batch_size: int, rng: np.random.Generator):
  n = len(next(iter(data.values())))
  order = rng.permutation(n)
  for i in range(n // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {k: v[idx] for k, v in data.items()}


def epoch_record(state: TrainState, out: EpochOutput, rolled_back: bool, start: float) -> dict:
  """One epoch's entry of `fit`'s history (plain Python values)."""
  counts = param_counts(state)
  active = sum(int(np.sum(np.asarray(lifecycle.stage_in(v.seeds.stage, lifecycle.ACTIVE_STAGES))))
               for v in knn.find_layers(state.kasmina).values())
  return {
      "epoch": int(out.report.epoch), "train_loss": float(out.train_loss),
      "val_loss": float(out.val_loss),
      **{f"val_{k}": float(v) for k, v in out.val_metrics.items()},
      "params": counts["model"], "active_seeds": active, "rolled_back": rolled_back,
      "stages": {k: _stage_names(v) for k, v in out.new_stage.items()},
      "time": time.perf_counter() - start,
  }


class PlainProgress:
  """A dependency-free progress line on stderr (what `progress_bar` gives without tqdm):
  `update`, `set_postfix` and `close` as tqdm's, redrawn at most every `interval` seconds."""

  def __init__(self, total: int, description: str, *, stream=None, interval: float = 1.0):
    self.total, self.description, self.n = int(total), description, 0
    self.postfix = ""
    self._stream = stream
    self._interval = interval
    self._last = -float("inf")

  @property
  def stream(self):
    return sys.stderr if self._stream is None else self._stream

  def _draw(self, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self._last < self._interval:
      return
    self._last = now
    self.stream.write(f"\r{self.description}: {self.n}/{self.total} steps {self.postfix}".rstrip())
    self.stream.flush()

  def update(self, n: int = 1) -> None:
    self.n += n
    self._draw()

  def set_postfix(self, **fields) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in fields.items())
    self._draw(force=True)

  def close(self) -> None:
    self._draw(force=True)
    self.stream.write("\n")
    self.stream.flush()


def progress_bar(total: int, description: str):
  """A tqdm bar when tqdm is installed (an optional extra, not a dependency), else a
  `PlainProgress` line, so `fit(progress=True)` works on a bare install."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return PlainProgress(total, description)
  return tqdm(total=total, desc=description, leave=False)


def fit(state: TrainState, train_data: dict, val_data: dict, loss_fn: LossFn, *,
        epochs: int, batch_size: int, policy: Callable = tamiyo.decide, seed: int = 0,
        log_path: str | None = None, progress: bool = True, rollback: bool = True,
        description: str = "fit"):
  """Trains for `epochs` epochs over in-memory arrays (`train_data["x"]` plus labels).

  Returns `(state, history)`, `history` a list of per-epoch dicts (losses, metrics, stages,
  parameter counts, wall time). With `log_path`, writes the JSONL event log.
  """
  check_fit_args(train_data, epochs, batch_size)
  return fit_loop(
      state, train_data, val_data, loss_fn, epochs=epochs, batch_size=batch_size,
      policy=policy, seed=seed, log_path=log_path, progress=progress, rollback=rollback,
      description=description)


def check_fit_args(train_data: dict, epochs: int, batch_size: int) -> None:
  _checks.positive_int("epochs", epochs)
  _checks.positive_int("batch_size", batch_size)
  n = len(train_data["x"])
  if batch_size > n:
    raise ValueError(f"batch_size: {batch_size} exceeds the {n} training rows")


def fit_loop(state: TrainState, train_data: dict, val_data: dict, loss_fn: LossFn, *,
             epochs: int, batch_size: int, policy: Callable = tamiyo.decide, seed: int = 0,
             log_path: str | None = None, progress: bool = True, rollback: bool = True,
             description: str = "fit", step: Callable = train_step,
             end: Callable = end_of_epoch, batch_hook: Callable | None = None,
             primary: bool = True, run_info: dict | None = None):
  """The epoch loop of every `fit` (this module's and `distributed.fit`): batches in a
  (seed, epoch) order, `step(state, batch, loss_fn)` per batch, `end(state, val_data, loss_fn,
  policy=, last_good=, log=)` per epoch, the in-memory last good state, the event log and
  progress (on the `primary` process only), and the history.

  `batch_hook(batch)` places a batch before its step (None: as is); `run_info` joins the
  event log's run record."""
  n = len(train_data["x"])
  from kasmina_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  last_good = ckpt_lib.InMemoryCheckpoint() if rollback else None
  if last_good is not None:
    last_good.save(state)
  log = None
  if log_path is not None and primary:
    from kasmina_jax import events  # pylint: disable=g-import-not-at-top
    log = events.EventLog(log_path, run={"description": description, "epochs": epochs,
                                         "batch_size": batch_size, "seed": seed,
                                         **(run_info or {})})
  steps_per_epoch = n // batch_size
  bar = progress_bar(epochs * steps_per_epoch, description) if progress and primary else None
  history = []
  start = time.perf_counter()
  try:
    for _ in range(epochs):
      # The data order depends on (seed, epoch) only, so a resumed run sees the same batches.
      rng = np.random.default_rng([seed, int(state.epoch)])
      for batch in _batches(train_data, batch_size, rng):
        if batch_hook is not None:
          batch = batch_hook(batch)
        state, _ = step(state, batch, loss_fn)
        if bar is not None:
          bar.update(1)
      state, out, rolled_back = end(state, val_data, loss_fn, policy=policy,
                                    last_good=last_good, log=log)
      record = epoch_record(state, out, rolled_back, start)
      history.append(record)
      if bar is not None:
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        acc=f"{record.get('val_accuracy', float('nan')):.3f}",
                        seeds=record["active_seeds"])
  finally:
    if bar is not None:
      bar.close()
    if log is not None:
      log.close()
  return state, history


def cross_entropy_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
  """Mean softmax cross-entropy against integer `batch["y"]`, with accuracy."""
  labels = batch["y"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return jnp.mean(loss), {"accuracy": acc}

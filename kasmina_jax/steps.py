"""The jitted train step and the pure epoch-level functions (what `kasmina_jax.training`
re-exports; the loop around them is `kasmina_jax.loop`, the losses `kasmina_jax.losses`).

Per step (`train_step`, pure, jitted): task loss + the TRAINING seeds' objectives, one
optimizer update masked by stage (`kasmina_jax.optim`), telemetry accumulation (inside the
layers), per-seed alpha updates from the layers' grafting strategies, host drift and gradient
norms.

Per epoch (`epoch_transition`, pure, jitted): validation "as is", the per-seed validation
counterfactual `delta = val_loss(seed off) - val_loss(seed on)`, health reports,
`tick_epoch` -> `update_readiness` -> `policy` (default `tamiyo.decide`) -> `apply_commands`
-> `reinit_children` (+ optimizer reset) -> field reports -> `tamiyo.observe`; the rollbacks
(`apply_rollback`, `rollback_in_place`).

The seeds' side of both lives in `orchestration` (framework-free, over the
`{layer path: LayerSlot}` map that `linen.layer_slots` builds); here are the Linen-shaped
passes around it. `model` is anything with Linen's `apply` contract: a Linen module, or
`kasmina_jax.nnx.NnxModel` (`kasmina_jax.nnx.create_train_state`), so one loop serves both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from kasmina_jax import _checks
from kasmina_jax import _forwarding
from kasmina_jax import grafting as graft_lib
from kasmina_jax import kernels
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import optim
from kasmina_jax import orchestration as orch
from kasmina_jax import tamiyo
from kasmina_jax import tolerance
from kasmina_jax.losses import LossFn

@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static settings of the train step and the epoch transition.

  max_judged: seeds whose validation counterfactual is measured per epoch end (two masked
  passes each; the seeds in TRAINING, EVALUATING and FINE_TUNING are judged; when more are
  waiting, the window of judged seeds moves on by `max_judged` seed indices every epoch, so
  every seed is judged at least once every `ceil(num_seeds / max_judged)` epochs and none is
  left unjudged for good); counterfactual_batch: how many of those passes run at once under `vmap`.
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
  # The host params at the last drift window start, as `orchestration.drift_snapshot` samples
  # them (every s-th row of a leaf with more than `DRIFT_ROWS` rows; children: as created).
  host_snapshot: Any
  stats: EpochStats
  model: Any = struct.field(pytree_node=False)  # the Linen module (hashable)
  tx: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
  config: TrainConfig = struct.field(pytree_node=False)
  # The model's other variable collections ({name: tree}; Linen: e.g. "batch_stats"; NNX: its
  # non-parameter state, `nnx.NnxModel.STATE`): mutable in every training pass, read as they
  # are by evaluation passes, kept when a step is skipped for a non-finite loss.
  model_state: Any = struct.field(default_factory=dict)

  @property
  def layers(self) -> dict[tuple, knn.KasminaVars]:
    return knn.find_layers(self.kasmina)


layer_name = orch.layer_name


def seeds_tree(kasmina) -> dict[tuple, lifecycle.SeedState]:
  """The seed states of every layer, keyed by layer path (what Tamiyo decides on)."""
  return knn.seed_states(kasmina)


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
                         rng, config, max_grad_norm=max_grad_norm, metric_names=metric_names,
                         model_state=other_collections(variables))


def other_collections(variables) -> dict:
  """The collections of a Linen model's variables besides params and Kasmina's (e.g.
  "batch_stats"): `TrainState.model_state`."""
  skip = ("params", knn.KASMINA, knn.KASMINA_AUX, knn.KASMINA_EVAL)
  return {k: v for k, v in variables.items() if k not in skip}


def new_train_state(model, params, kasmina, optimizer: optax.GradientTransformation,
                    rng: jax.Array, config: TrainConfig = TrainConfig(), *,
                    max_grad_norm: float | None = None,
                    metric_names: tuple[str, ...] = ("accuracy",),
                    model_state: dict | None = None) -> TrainState:
  """A `TrainState` from initialised `params` and `kasmina` collection; `model` is anything
  with Linen's `apply(variables, x, train=..., mutable=[...])` (a Linen module, or
  `kasmina_jax.nnx.NnxModel` for an NNX model), so every shell trains through this module.
  `model_state`: the model's other variable collections (`TrainState.model_state`)."""
  if not knn.find_layers(kasmina):
    raise ValueError("model: found no Kasmina layer (kasmina_jax.nn.KasminaLayer) in it")
  tx = _wrapped_optimizer(optimizer, max_grad_norm)
  slots = knn.layer_slots(kasmina)
  if not any(isinstance(s.seeds.stage, jax.core.Tracer) for s in slots.values()):
    # (under a trace, e.g. a vmapped population of runs, `live` stays None: unknown)
    kasmina = knn.with_slots(kasmina, orch.with_liveness(slots))
  return TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), kasmina=kasmina,
      ctrl=orch.init_controller(knn.layer_slots(kasmina), config.tamiyo), rng=rng,
      host_snapshot=orch.drift_snapshot(params), stats=_zero_stats(metric_names),
      model=model, tx=tx,
      config=config, model_state=dict(model_state or {}))


def refresh_liveness(state: TrainState) -> TrainState:
  """`state` with each Kasmina layer's static `live` read from its seeds' stages (on the host,
  outside `jit`; `orchestration.with_liveness`). The train steps that follow compile a layer
  with no live seed without its child path and one with live seeds without a device-side
  branch. Stages change only at epoch boundaries, whose commits reset `live` to None
  (decided on the device each pass, always correct); the loops call this after each epoch
  end (`loop.finish_epoch`) and `new_train_state` at the start."""
  slots = orch.with_liveness(knn.layer_slots(state.kasmina))
  return state.replace(kasmina=knn.with_slots(state.kasmina, slots))


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


@_forwarding.forwarding_jit(static_argnames=("loss_fn", "row_split"))
def train_step(state: TrainState, batch: dict, loss_fn: LossFn,
               row_split: kernels.RowSplit | None = None) -> tuple[TrainState, dict]:
  """One optimisation step. `batch["x"]` is the model input; `loss_fn(out, batch)` returns
  `(loss, metrics)`. Non-finite losses or host gradients skip the update (and count in the
  epoch statistics, which is what triggers Tamiyo's emergency rollback).

  `row_split` (static): the batch's rows are split over that mesh axis; the layers' fused
  kernels then run per device on their rows (`kernels.split_rows`). None: one program.

  The leaves of `state` the step leaves alone (the controller's memory, a dormant layer's
  seeds, frozen children and their moments) come back as the caller's own arrays rather than
  copies (`_forwarding.forwarding_jit`): values as `jax.jit`'s, a cheaper call."""
  with kernels.split_rows(row_split):
    return _train_step(state, batch, loss_fn)


def _train_step(state: TrainState, batch: dict, loss_fn: LossFn) -> tuple[TrainState, dict]:
  kasmina = state.kasmina

  def objective(params):
    out, mutated = state.model.apply(
        {"params": params, knn.KASMINA: kasmina, **state.model_state}, batch["x"], train=True,
        mutable=[knn.KASMINA, knn.KASMINA_AUX, *state.model_state])
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
  frozen = [p for p, s in knn.layer_slots(kasmina).items() if s.live is False]
  learn_mask = optim.learning_mask(state.params, seed_map, fossil=fossil, frozen_layers=frozen)
  updates, opt_state = state.tx.update(
      grads, state.opt_state, state.params, learn_mask=learn_mask,
      host_partition=optim.host_partition_mask(state.params, seed_map, fossil=fossil))
  params = optim.keep_frozen(learn_mask, optax.apply_updates(state.params, updates),
                             state.params)
  # Leaves the update left alone (a dormant layer's children and moments) stay the very input
  # arrays, which `train_step` then forwards rather than copies.
  keep = lambda new, old: jax.tree.map(
      lambda a, b: a if a is b else jnp.where(finite, a, b), new, old)
  params = keep(params, state.params)
  opt_state = keep(opt_state, state.opt_state)
  model_state = {k: _keep_state(finite, mutated[k], v) for k, v in state.model_state.items()}

  cfg = state.config
  drift = host_drift(params, state.host_snapshot)
  step = state.step + 1
  refresh = (step % cfg.grafting.fixed_steps) == 0
  snapshot = orch.refresh_snapshot(refresh, params, state.host_snapshot)

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
                            kasmina=new_kasmina, host_snapshot=snapshot, stats=stats,
                            model_state=model_state)
  return new_state, {"loss": task, "total_loss": total, **metrics}


def _keep_state(finite, new, old):
  """The mutated collection where the step was finite, else the old one (PRNG key leaves,
  which `jnp.where` does not take, are passed through: a key stream's state is its count)."""
  def leaf(a, b):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return a
    return jnp.where(finite, a, b)
  return jax.tree.map(leaf, new, old)


# ----------------------------------------------------------------------------- epoch end


@struct.dataclass
class EpochOutput:
  """What one epoch transition decided and measured (per layer dicts keyed by layer path,
  as `linen.find_layers`; `layer_name` gives the path's "a/b" string)."""

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
  variables = {"params": state.params, knn.KASMINA: state.kasmina, **state.model_state}
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
  # The search starts at a seed index that moves on by `m` each epoch: with more judged-stage
  # seeds than `m`, a fixed lowest-index-first choice would leave the same ones unjudged
  # every epoch (never advanced, never culled; measured on the char LM: the block seeds).
  start = jnp.mod(state.epoch.astype(jnp.int32) * m, total)
  order = jnp.mod(jnp.arange(total, dtype=jnp.int32) + start, total)
  (pos,) = jnp.nonzero(judged[order], size=m, fill_value=-1)
  idx = jnp.where(pos >= 0, order[jnp.maximum(pos, 0)], -1)
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
  # A difference within float noise of the losses is no difference: reported as exactly 0, so
  # that a child that changes nothing is judged the same on every device count (`tolerance`).
  delta_m = tolerance.snap_difference(losses[:m], losses[m:])
  delta_flat = jnp.full((total,), jnp.nan, jnp.float32)
  delta_flat = delta_flat.at[jnp.where(idx >= 0, idx, total)].set(delta_m, mode="drop")
  return {p: delta_flat[offsets[i]:offsets[i + 1]] for i, p in enumerate(paths)}


@functools.partial(jax.jit, static_argnames=("loss_fn", "policy", "row_split"))
def epoch_transition(state: TrainState, val_batch: dict, loss_fn: LossFn,
                     policy: Callable = tamiyo.decide,
                     row_split: kernels.RowSplit | None = None) -> tuple[TrainState, EpochOutput]:
  """The pure end-of-epoch function (see the module docstring); `row_split` as in
  `train_step`, for the validation passes."""
  with kernels.split_rows(row_split):
    return _epoch_transition(state, val_batch, loss_fn, policy)


def _epoch_transition(state: TrainState, val_batch: dict, loss_fn: LossFn,
                      policy: Callable) -> tuple[TrainState, EpochOutput]:
  cfg = state.config
  layers = knn.find_layers(state.kasmina)
  steps = jnp.maximum(state.stats.steps, 1.0)
  train_loss = state.stats.loss_sum / steps
  train_loss = jnp.where(state.stats.nonfinite_steps > 0, jnp.nan, train_loss)
  train_metrics = {k: v / steps for k, v in state.stats.metric_sums.items()}
  val_loss, val_metrics, summaries = evaluate(state, val_batch, loss_fn)
  deltas = counterfactual_deltas(state, val_batch, loss_fn)

  slots = knn.layer_slots(state.kasmina)
  old = seeds_tree(state.kasmina)
  recon = {p: knn.get_path(summaries, p)["step"].recon_ratio for p in layers}
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

"""Orchestration: the per-step seed update, the epoch decision and commit, and the rollback,
as pure functions over a `{layer path: LayerSlot}` map and the params pytree.

docs/design.md, "Layering": this sits between the core (`lifecycle`, `layer`,
`grafting`, `telemetry`) and the loop, and imports no Flax. The shells (`linen`, `nnx`) turn
their own storage into the map (`linen.layer_slots`, `nnx.layer_slots`) and back, so the Linen
and NNX training paths run the same code, and a change to the epoch sequence lands in one
place.

Children live in the params pytree under `layer path + ("children",)`: a `ChildParams`
(Linen) or a mapping with exactly its fields (what `nnx.state` makes of the NNX layer's
per-field params); `get_children` / `set_children` read and write either form.

Every map of layers here is keyed by layer path (the tuple of keys down to the layer, as in
the params pytree): the slots, the seed states and commands Tamiyo decides on, the reports,
deltas, field reports. `layer_name` turns a path into the "a/b" string only where a result
leaves for JSON (history, event log, field-report records).

Every function here is jittable; the loops over layers unroll at trace time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import _struct as struct
from kasmina_jax import chunks
from kasmina_jax import grafting as graft_lib
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import optim
from kasmina_jax import tamiyo
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.blueprints import ChildParams


@struct.dataclass
class LayerSlot:
  """One Kasmina layer's non-parameter state; `spec` and `strategies` (the layer's grafting
  strategies, given at construction) are static (part of the treedef)."""

  seeds: lifecycle.SeedState
  telemetry: tel_lib.TelemetryState
  spec: layer_lib.KasminaSpec = struct.field(pytree_node=False)
  strategies: tuple = struct.field(pytree_node=False, default=graft_lib.DEFAULT_STRATEGIES)
  # What is known at trace time about the seeds' stages (`layer.forward`'s `live`): None
  # (unknown), False (no seed live), True (some seed may be live). Set from the stages by
  # `with_liveness` on the host; everything that changes stages (`install_seeds`, so every
  # commit and rollback) resets it to None.
  live: bool | None = struct.field(pytree_node=False, default=None,
                                   metadata={"derived": True})

  @property
  def strategy_names(self) -> tuple[str, ...]:
    return graft_lib.strategy_names(self.strategies)


def replace_keeping_live_honest(self, **updates):
  """`replace` of a layer's state: new `seeds` without a new `live` reset `live` to None
  (unknown): the static fact was read from the old stages and may not hold for the new."""
  if "seeds" in updates and "live" not in updates:
    updates["live"] = None
  return dataclasses.replace(self, **updates)


LayerSlot.replace = replace_keeping_live_honest

Slots = Mapping[tuple, LayerSlot]

# The one conversion of a layer path to a string, for JSON outputs (see the module docstring).
layer_name = tamiyo.layer_name


def seed_map(slots: Slots) -> dict[tuple, lifecycle.SeedState]:
  """`{layer path: SeedState}`: what `optim` takes and what Tamiyo decides on."""
  return {p: s.seeds for p, s in slots.items()}


def with_liveness(slots: Slots) -> dict[tuple, LayerSlot]:
  """`slots` with each layer's static `live` read from its stages (on the host: one transfer
  of the stage arrays; not under `jit`). A layer with no live seed then compiles without its
  child path, one with live seeds without a device-side branch (`layer.forward`'s `live`).
  Stages change only at epoch boundaries (commands, rollback), which reset `live` to None;
  call this after them."""
  stages = {p: s.seeds.stage for p, s in slots.items()}
  if any(isinstance(v, jax.core.Tracer) for v in stages.values()):
    raise TypeError("with_liveness reads the stages on the host: call it outside jit")
  out = {}
  for path, slot in slots.items():
    live = bool(np.any(chunks.stage_masks(_host_value(stages[path]))[3]))
    out[path] = slot.replace(live=live)
  return out


def _host_value(x) -> np.ndarray:
  """`x` on the host; of an array spread over several processes (replicated, as the stages
  are under `distributed`), this process's copy, so that every process decides alike."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def num_strategies(slots: Slots) -> dict[tuple, int]:
  """`{layer path: number of grafting strategies}` (for `tamiyo.init_controller`)."""
  return {p: len(s.strategies) for p, s in slots.items()}


def num_blueprints(slots: Slots) -> dict[tuple, int]:
  """`{layer path: catalog size}` (for `tamiyo.init_controller`)."""
  return {p: s.spec.num_blueprints for p, s in slots.items()}


def init_controller(slots: Slots, config: tamiyo.TamiyoConfig) -> tamiyo.ControllerState:
  """Tamiyo's fresh memory for these layers (keyed by path, sized by their catalogs and
  grafting strategies)."""
  return tamiyo.init_controller(seed_map(slots), num_blueprints(slots), config,
                                num_strategies=num_strategies(slots))


def layer_reports(slots: Slots) -> dict[tuple, tamiyo.LayerReport]:
  """Each layer's `tamiyo.LayerReport` from its telemetry (keyed by path)."""
  return {p: tamiyo.layer_report(
      s.spec, layer_lib.health_report(s.spec, s.telemetry, s.seeds), s.strategy_names)
          for p, s in slots.items()}


# --------------------------------------------------------------------------------- tree access


def get_path(tree: Any, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: Any, path: tuple, value: Any) -> Any:
  """A copy of nested mappings `tree` (as plain dicts along `path`) with `value` at `path`."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = set_path(tree[path[0]], path[1:], value)
  return new


def children_path(path: tuple) -> tuple:
  return path + ("children",)


def get_children(params: Any, path: tuple) -> ChildParams:
  """The children record (`ChildParams`, or `SequenceChildParams` of a sequence layer) of the
  layer at `path` (built from a field mapping under NNX)."""
  node = get_path(params, children_path(path))
  if isinstance(node, optim.CHILD_TYPES):
    return node
  return optim.child_type_of_fields(dict(node).keys())(**dict(node))


def set_children(params: Any, path: tuple, children: ChildParams) -> Any:
  """`params` with the layer's children replaced, in the form they were stored in."""
  cpath = children_path(path)
  if isinstance(get_path(params, cpath), optim.CHILD_TYPES):
    return set_path(params, cpath, children)
  return set_path(params, cpath, {k: getattr(children, k) for k in get_path(params, cpath)})


# ------------------------------------------------------------------------------- norms, drift


def host_only(tree):
  """`tree` with every child-parameter subtree replaced by zeros (host partition only)."""
  is_child = optim._is_child  # pylint: disable=protected-access
  return jax.tree.map(lambda x: jax.tree.map(jnp.zeros_like, x) if is_child(x) else x, tree,
                      is_leaf=is_child)


def _sq_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
             jnp.zeros((), jnp.float32))


def host_grad_norm(grads) -> jax.Array:
  return jnp.sqrt(_sq_norm(host_only(grads)))


def child_grad_norms(grads, path: tuple) -> jax.Array:
  """(K,) gradient norm of each seed's child in the layer at `path`."""
  child = get_path(grads, children_path(path))
  sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1) for x in jax.tree.leaves(child))
  return jnp.sqrt(sq)


# The drift is measured on at most about this many rows of each parameter leaf (every s-th
# row, s = rows // DRIFT_ROWS, of a leaf with more rows): the snapshot then costs a fraction of
# the parameters' memory, and the per-step refresh and drift a fraction of a pass over them
# (at 4096 rows, 1/16), which a dormant model would otherwise pay every step. Rows of a weight
# matrix are exchangeable for this ratio; a model whose leaves all have <= DRIFT_ROWS rows
# (every small model) is measured exactly.
DRIFT_ROWS = 256


def _drift_rows(x: jax.Array) -> jax.Array:
  """The rows of `x` the drift is measured on (all of them up to `DRIFT_ROWS`). Idempotent:
  a sample has fewer than 2 * DRIFT_ROWS rows, so it is its own sample (a snapshot leaf and
  its param leaf both map to the same rows)."""
  stride = x.shape[0] // DRIFT_ROWS if jnp.ndim(x) >= 2 else 1
  return x if stride <= 1 else x[::stride]


def drift_snapshot(params):
  """A fresh drift snapshot of `params`: the sampled rows (`DRIFT_ROWS`) of every host leaf
  (copies); the children as they are (the drift never reads them)."""
  is_child = optim._is_child  # pylint: disable=protected-access
  return jax.tree.map(lambda x: jax.tree.map(jnp.copy, x) if is_child(x)
                      else jnp.copy(_drift_rows(x)), params, is_leaf=is_child)


def refresh_snapshot(refresh: jax.Array, params, snapshot):
  """`snapshot` with its host rows set to `params`' where `refresh` (a traced bool); the
  children's leaves are returned as they are."""
  is_child = optim._is_child  # pylint: disable=protected-access
  return jax.tree.map(lambda p, s: s if is_child(p) else jnp.where(refresh, _drift_rows(p), s),
                      params, snapshot, is_leaf=is_child)


def host_drift(params, snapshot) -> jax.Array:
  """`||theta - theta_snap|| / ||theta_snap||` over the host's parameters (the whole model:
  the epoch report's figure; grafting uses each layer's own, `layer_host_drift`), on the rows
  `drift_snapshot` keeps (`DRIFT_ROWS`). `snapshot` may also be a full copy of `params`."""
  p = jax.tree.map(_drift_rows, host_only(params))
  s = jax.tree.map(_drift_rows, host_only(snapshot))
  diff = jax.tree.map(lambda a, b: a - b, p, s)
  return jnp.sqrt(_sq_norm(diff)) / jnp.maximum(jnp.sqrt(_sq_norm(s)), 1e-12)


def wrapped_host_path(path: tuple) -> tuple:
  """Where the weights of the host layer that the Kasmina layer at `path` wraps live: the
  module holding that Kasmina layer (`KasminaDense`: its host layer beside "kasmina").
  A Kasmina layer placed directly in the model's top module wraps no one layer there; it
  falls back to the whole model's host parameters."""
  return tuple(path[:-1])


def layer_host_drift(params, snapshot, path: tuple) -> jax.Array:
  """`||theta - theta_snap|| / ||theta_snap||` over the host weights wrapped by the Kasmina
  layer at `path` (the non-child parameters under `wrapped_host_path(path)`), so that
  DRIFT_CONTROLLED pauses a seed on its own layer's drift, not on the model's (docs/design.md,
  "Grafting strategies")."""
  host = wrapped_host_path(path)
  return host_drift(get_path(params, host), get_path(snapshot, host))


# ----------------------------------------------------------------------------------- per step


# Built-in strategies that never read `GraftSignals.host_drift`.
_DRIFT_FREE_STRATEGIES = (graft_lib.fixed_ramp, graft_lib.performance_linked,
                          graft_lib.grad_norm_gated)

def step_update(slots: Slots, *, old_params, params, grads, snapshot, summaries: Mapping,
                host_norm: jax.Array, grafting: graft_lib.GraftingConfig,
                fossil: str) -> dict[tuple, LayerSlot]:
  """The seeds' side of one optimisation step, per layer: the whole trust-region objective
  (from the child gradients), `tick_step`, the grafting strategies' alpha update on the
  layer's own host drift, the pass's non-finite flags, and the child gradient telemetry.

  `slots`: the layers after the forward pass (telemetry updated); `old_params`: the params
  the gradients were taken at; `params`: after the update; `snapshot`: the drift window's
  start; `summaries`: `{layer path: step summary}` (`.objective`, `.nonfinite`).
  """
  out = {}
  for path, slot in slots.items():
    if slot.live is False:
      # No live seed (known at trace time): no child objective to record, no alpha to move, no
      # child gradient (learning stages are live ones), no non-finite child. Only GERMINATED
      # seeds' step counters move; every other array is returned as it came, so a jitted step
      # forwards it instead of copying it (`_forwarding`).
      out[path] = slot.replace(seeds=lifecycle.tick_step(slot.seeds), live=False)
      continue
    summary = summaries[path]
    objective = layer_lib.whole_objective(
        slot.spec, get_children(old_params, path), get_children(grads, path), slot.seeds,
        summary.objective, summary.nonfinite)
    seeds = lifecycle.tick_step(slot.seeds)
    # The layer's drift is read only by a GRAFTING seed whose strategy may read it (every
    # strategy but the three built-ins known not to): skip its pass over the host weights
    # otherwise.
    # strategy but the three built-ins known not to), and none while no seed is live (known
    # at trace time). No `lax.cond`: on a GPU its predicate is read on the host, which stalls
    # the step; the pass is a read of one host kernel and its snapshot.
    drift_ids = [i for i, s in enumerate(slot.strategies) if s not in _DRIFT_FREE_STRATEGIES]
    if drift_ids and slot.live is not False:
      reads_drift = jnp.any((seeds.stage == lifecycle.Stage.GRAFTING)
                            & jnp.isin(seeds.strategy, jnp.asarray(drift_ids, jnp.int32)))
      drift = jnp.where(reads_drift, layer_host_drift(params, snapshot, path), 0.0)
    else:
      drift = jnp.zeros((), jnp.float32)
    signals = graft_lib.GraftSignals(objective=objective, host_drift=drift,
                                     host_grad_norm=host_norm)
    seeds = graft_lib.grafting_step(seeds, signals, grafting, slot.strategies)
    seeds = seeds.replace(nonfinite=seeds.nonfinite | summary.nonfinite)
    learning = lifecycle.stage_in(seeds.stage, lifecycle.learning_stages(fossil))
    tel = tel_lib.record_gradients(slot.telemetry, child_grad_norms(grads, path), learning)
    # The step changes no stage (only counters, alpha and flags): `live` still holds.
    out[path] = slot.replace(seeds=seeds, telemetry=tel, live=slot.live)
  return out


# ---------------------------------------------------------------------------------- per epoch


def epoch_decide(slots: Slots, *, deltas: Mapping, recon_ratio: Mapping, train_loss, val_loss,
                 host_grad_norm_mean, host_drift_value, epoch, ctrl: tamiyo.ControllerState,
                 config: tamiyo.TamiyoConfig, policy: Callable = tamiyo.decide):
  """Health reports, `tick_epoch`, `update_readiness` (on the counterfactual `deltas` and
  `recon_ratio`, both `{layer path: (K,)}`) and the policy.

  Returns `(report, seeds, commands, ctrl)`, every map keyed by layer path.
  """
  reports, seeds = layer_reports(slots), {}
  for path, slot in slots.items():
    s = lifecycle.tick_epoch(slot.seeds)
    b = jnp.clip(s.blueprint, 0, slot.spec.num_blueprints - 1)
    is_repl = ~jnp.asarray(slot.spec.catalog.residual)[b]
    seeds[path] = lifecycle.update_readiness(s, delta=deltas[path],
                                             recon_ratio=recon_ratio[path],
                                             is_replacement=is_repl, config=config.lifecycle)
  report = tamiyo.EpochReport(
      layers=reports, train_loss=train_loss, val_loss=val_loss,
      host_grad_norm=host_grad_norm_mean, host_drift=host_drift_value, epoch=epoch)
  commands, ctrl = policy(report, seeds, ctrl, config)
  return report, seeds, commands, ctrl


def commit(slots: Slots, params, opt_state, seeds: Mapping, commands: Mapping, *,
           config: lifecycle.LifecycleConfig, epoch, keys: Mapping,
           reset_telemetry: bool):
  """The commit sequence: `apply_commands` -> `install_seeds` (`reinit_children`, optimizer
  reset).

  `seeds`, `commands` and `keys` (the germination key of each layer) are keyed by layer
  path, as `slots`. `seeds` are the states the commands apply to (after `tick_epoch` and
  `update_readiness`). `reset_telemetry` starts fresh accumulators (an epoch end; a rollback
  keeps them).

  Returns `(slots, params, opt_state, new_seeds, accepted)`.
  """
  _check_keys("seeds", seeds, slots)
  _check_keys("commands", commands, slots)
  new_seeds, accepted = {}, {}
  for path, slot in slots.items():
    new_seeds[path], accepted[path] = lifecycle.apply_commands(
        seeds[path], commands[path], config, num_blueprints=slot.spec.num_blueprints,
        num_strategies=len(slot.strategies), epoch=epoch)
  new_slots, params, opt_state = install_seeds(
      slots, params, opt_state, seeds, new_seeds, keys=keys, reset_telemetry=reset_telemetry)
  return new_slots, params, opt_state, new_seeds, accepted


def install_seeds(slots: Slots, params, opt_state, old_seeds: Mapping, new_seeds: Mapping, *,
                  keys: Mapping, reset_telemetry: bool):
  """Installs `new_seeds` (after `lifecycle.apply_commands`) in the layers: the children of
  a seed whose stage changed from `old_seeds` are (re)initialised (germination, from the
  layer's key in `keys`) or zeroed (`layer.reinit_children`); the optimizer state of those
  changed from the slots' seeds is reset (`opt_state` None: no optimizer state to reset).
  Every map is keyed by layer path. Returns `(slots, params, opt_state)`."""
  for name, mapping in (("old_seeds", old_seeds), ("new_seeds", new_seeds), ("keys", keys)):
    _check_keys(name, mapping, slots)
  new_slots = {}
  for path, slot in slots.items():
    children = layer_lib.reinit_children(slot.spec, get_children(params, path),
                                         old_seeds[path].stage, new_seeds[path], keys[path])
    params = set_children(params, path, children)
    tel = layer_lib.init_telemetry(slot.spec) if reset_telemetry else slot.telemetry
    new_slots[path] = slot.replace(seeds=new_seeds[path], telemetry=tel, live=None)
  if opt_state is not None:
    reset = optim.reset_mask(params, seed_map(slots), seed_map(new_slots))
    opt_state = optim.reset_children(opt_state, params, reset)
  return new_slots, params, opt_state


def _check_keys(name: str, mapping: Mapping, slots: Slots) -> None:
  if not isinstance(mapping, Mapping) or set(mapping) != set(slots):
    got = sorted(mapping, key=str) if isinstance(mapping, Mapping) else type(mapping).__name__
    raise ValueError(f"{name}: expected one entry per layer path {sorted(slots, key=str)}, "
                     f"got {got}")


def epoch_keys(slots: Slots, key: jax.Array) -> dict[tuple, jax.Array]:
  """One germination key per layer at an epoch end: `fold_in(key, layer index)`."""
  return {p: jax.random.fold_in(key, i) for i, p in enumerate(slots)}


@struct.dataclass
class EpochEnd:
  """What `epoch_end` decided and committed (`report.layers`, `commands`, `accepted`,
  `new_seeds` and `field_reports` keyed by layer path, as the slots)."""

  slots: Any
  params: Any
  opt_state: Any
  ctrl: tamiyo.ControllerState
  report: tamiyo.EpochReport
  commands: Any
  accepted: Any
  new_seeds: Any
  field_reports: Any


def epoch_end(slots: Slots, params, opt_state, ctrl: tamiyo.ControllerState, *, deltas: Mapping,
              recon_ratio: Mapping, train_loss, val_loss, host_grad_norm_mean,
              host_drift_value, epoch, key: jax.Array, config: tamiyo.TamiyoConfig,
              policy: Callable = tamiyo.decide) -> EpochEnd:
  """The epoch end after the measurements: `epoch_decide` -> `commit` (germination keys
  `epoch_keys(slots, key)`, fresh telemetry) -> field reports -> `tamiyo.observe`.

  When the policy asks for an emergency rollback the reports do not feed the controller
  here: the rollback (`rollback`) reports the seeds it ends, and they must not count twice.
  """
  report, seeds, commands, ctrl = epoch_decide(
      slots, deltas=deltas, recon_ratio=recon_ratio, train_loss=train_loss, val_loss=val_loss,
      host_grad_norm_mean=host_grad_norm_mean, host_drift_value=host_drift_value, epoch=epoch,
      ctrl=ctrl, config=config, policy=policy)
  new_slots, params, opt_state, new_seeds, accepted = commit(
      slots, params, opt_state, seeds, commands, config=config.lifecycle, epoch=epoch,
      keys=epoch_keys(slots, key), reset_telemetry=True)
  fr = tamiyo.field_reports(seeds, new_seeds, report, ctrl)
  observed = tamiyo.observe(ctrl, fr, config)
  ctrl = jax.tree.map(lambda a, b: jnp.where(ctrl.rollback_requested, a, b), ctrl, observed)
  return EpochEnd(slots=new_slots, params=params, opt_state=opt_state, ctrl=ctrl,
                  report=report, commands=commands, accepted=accepted, new_seeds=new_seeds,
                  field_reports=fr)


def rollback(slots: Slots, params, opt_state, ctrl: tamiyo.ControllerState, *,
             config: tamiyo.TamiyoConfig, epoch, key: jax.Array):
  """In-flight seeds become ROLLED_BACK (GERMINATED ones CANCELLED), their children are
  zeroed and their optimizer state reset; their field reports feed `ctrl`, whose rollback
  request is cleared. Returns `(slots, params, opt_state, ctrl, field_reports)`."""
  seeds = seed_map(slots)
  commands = tamiyo.rollback_commands(seeds)
  new_slots, params, opt_state, new_seeds, _ = commit(
      slots, params, opt_state, seeds, commands, config=config.lifecycle, epoch=epoch,
      keys={p: key for p in slots}, reset_telemetry=False)
  empty = tamiyo.EpochReport(
      layers=layer_reports(slots),
      train_loss=jnp.float32(jnp.nan), val_loss=jnp.float32(jnp.nan),
      host_grad_norm=jnp.float32(0.0), host_drift=jnp.float32(0.0), epoch=epoch)
  fr = tamiyo.field_reports(seeds, new_seeds, empty, ctrl)
  ctrl = tamiyo.observe(ctrl.replace(rollback_requested=jnp.zeros((), bool)), fr, config)
  return new_slots, params, opt_state, ctrl, fr

"""The policy: `decide(report, seeds, ctrl, config) -> (commands, ctrl)`, in named steps."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import lifecycle
from kasmina_jax import telemetry
from kasmina_jax import tolerance
from kasmina_jax.lifecycle import Op, SeedState, Stage
from kasmina_jax.tamiyo.config import (
    FIXED_RAMP,
    PERFORMANCE_LINKED,
    DRIFT_CONTROLLED,
    GRAD_NORM_GATED,
    GRAFTING_STRATEGY_NAMES,
    SelectionStrategy,
    TamiyoConfig,
    _check_config)
from kasmina_jax.tamiyo.reports import LayerReport, EpochReport, _finite_or, _health_matrix
from kasmina_jax.tamiyo.state import (
    LayerControllerState,
    ControllerState,
    _is_seed_state,
    _flatten_layers,
    _up_to,
    _check_layer)


def _signature(health: telemetry.HealthReport):
  """Per seed (stuck, noise, dead, corr), each in [0, 1]; non-finite inputs count 0."""
  var = jnp.maximum(_finite_or(jnp.asarray(health.chunk_variance, jnp.float32), 0.0), 0.0)
  mean_var = jnp.mean(var)
  rel = jnp.where(mean_var > 0, var / jnp.where(mean_var > 0, mean_var, 1.0), 0.0)
  stuck = jnp.clip(1.0 - rel, 0.0, 1.0)
  noise = jnp.clip(rel - 1.0, 0.0, 1.0)
  dead = jnp.clip(_finite_or(jnp.asarray(health.dead_node_ratio, jnp.float32), 0.0), 0.0, 1.0)
  corr = jnp.clip(
      _finite_or(jnp.asarray(health.avg_inter_node_correlation, jnp.float32), 0.0), 0.0, 1.0)
  return stuck, noise, dead, corr


def need_score(health: telemetry.HealthReport, config: TamiyoConfig = TamiyoConfig()) -> jax.Array:
  """(K,) in [0, 1]: how much each seed's chunk needs help (see the module docstring)."""
  stuck, _, dead, corr = _signature(health)
  w = (config.variance_weight, config.dead_weight, config.correlation_weight)
  return (w[0] * stuck + w[1] * dead + w[2] * corr) / sum(w)


def _recent(ring: jax.Array, count: jax.Array, n: int):
  """The newest `n` entries of a ring buffer (newest first) and which of them exist."""
  h = ring.shape[0]
  i = jnp.arange(n)
  idx = jnp.mod(count - 1 - i, h)
  exists = (i < count) & (i < h)
  return ring[idx], exists


def _masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of `values[mask]` (NaN when empty), static shapes."""
  m = jnp.sum(mask.astype(jnp.int32))
  s = jnp.sort(jnp.where(mask, values, jnp.inf))
  lo = jnp.clip((m - 1) // 2, 0, values.shape[0] - 1)
  hi = jnp.clip(m // 2, 0, values.shape[0] - 1)
  return jnp.where(m > 0, 0.5 * (s[lo] + s[hi]), jnp.nan)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask & jnp.isfinite(values)
  n = jnp.sum(m.astype(jnp.float32))
  return jnp.where(n > 0, jnp.sum(jnp.where(m, values, 0.0)) / jnp.maximum(n, 1.0), jnp.nan)


def _grafting_choice(report: EpochReport, ctrl: ControllerState, config: TamiyoConfig):
  """The host-trend rule's pick among the built-in strategies (a `GraftingStrategy` id);
  `_layer_strategy` turns it into an id into each layer's own strategies."""
  w = config.trend_window
  drift_prev, drift_ok = _recent(ctrl.drift_history, ctrl.history_count, w - 1)
  grad_prev, grad_ok = _recent(ctrl.grad_history, ctrl.history_count, w - 1)
  drift_now = jnp.asarray(report.host_drift, jnp.float32)
  grad_now = jnp.asarray(report.host_grad_norm, jnp.float32)
  drift = _masked_mean(jnp.concatenate([drift_now[None], drift_prev]),
                       jnp.concatenate([jnp.ones((1,), bool), drift_ok]))
  grad = _masked_mean(jnp.concatenate([grad_now[None], grad_prev]),
                      jnp.concatenate([jnp.ones((1,), bool), grad_ok]))
  last_val, has_last = _recent(ctrl.val_history, ctrl.history_count, 1)
  val = jnp.asarray(report.val_loss, jnp.float32)
  improvement = (last_val[0] - val) / jnp.maximum(jnp.abs(last_val[0]), 1e-12)
  # Trends at their thresholds count as inside (`tolerance`: no flip on float noise).
  fast = (has_last[0] & jnp.isfinite(improvement)
          & tolerance.greater(improvement, config.fast_improvement))
  drifting = jnp.isfinite(drift) & tolerance.greater(drift, config.drift_threshold)
  # No finite measurement at all counts as stable (a non-finite loss is an emergency anyway).
  grad_bad = jnp.isfinite(grad) & (tolerance.less(grad, config.grad_norm_lower)
                                   | tolerance.greater(grad, config.grad_norm_upper))
  return jnp.select([drifting, grad_bad, fast],
                    [jnp.int32(DRIFT_CONTROLLED), jnp.int32(GRAD_NORM_GATED),
                     jnp.int32(PERFORMANCE_LINKED)], jnp.int32(FIXED_RAMP))


def _fixed_strategy(names: tuple[str, ...], config: TamiyoConfig) -> int:
  """`config.grafting_strategy` as an id into a layer's strategies `names` (before tracing)."""
  fixed = config.grafting_strategy
  if isinstance(fixed, str):
    if fixed not in names:
      raise ValueError(f"grafting_strategy: {fixed!r} is not one of a layer's grafting "
                       f"strategies {names}")
    return names.index(fixed)
  if fixed >= len(names):
    raise ValueError(f"grafting_strategy: id {fixed} is out of range for a layer with "
                     f"{len(names)} grafting strategies {names}")
  return fixed


def _strategy_scores(lc: LayerControllerState, config: TamiyoConfig) -> jax.Array:
  """(S,) UCB score of each of a layer's grafting strategies from their field reports."""
  n = lc.sg_count
  mean = lc.sg_reward_sum / jnp.maximum(n, 1.0)
  return mean + config.ucb_c * jnp.sqrt(jnp.log(jnp.sum(n) + 1.0) / (n + 1.0))


def _layer_strategy(rule: jax.Array, lr: LayerReport, lc: LayerControllerState,
                    config: TamiyoConfig) -> jax.Array:
  """() int32: the grafting strategy (an id into the layer's `strategy_names`) of the seeds
  the layer germinates this epoch (see `TamiyoConfig.grafting_selection`)."""
  names = lr.strategy_names
  if config.grafting_strategy is not None:
    return jnp.int32(_fixed_strategy(names, config))
  # Ties (within `tolerance`): the lowest id.
  bandit = tolerance.best_index(_strategy_scores(lc, config))
  if config.grafting_selection == "bandit":
    return bandit
  # The rule's built-in pick, found by name among the layer's strategies (-1: not given).
  table = jnp.asarray([names.index(n) if n in names else -1 for n in GRAFTING_STRATEGY_NAMES],
                      jnp.int32)
  mapped = table[rule]
  return jnp.where(mapped >= 0, mapped, bandit).astype(jnp.int32)


def _blueprint_scores(lr: LayerReport, lc: LayerControllerState, health_sig,
                      config: TamiyoConfig) -> jax.Array:
  """(K, B) score of each blueprint for each seed (see the module docstring)."""
  params = jnp.asarray(lr.blueprint_params, jnp.float32)
  flops = jnp.asarray(lr.blueprint_flops, jnp.float32)
  repl = jnp.asarray(lr.blueprint_replacement, bool).astype(jnp.float32)
  par = jnp.asarray(lr.blueprint_parallel, bool).astype(jnp.float32)
  capacity = params / jnp.maximum(jnp.max(params), 1.0)
  cost = 0.5 * (capacity + flops / jnp.maximum(jnp.max(flops), 1.0))
  residual = 1.0 - repl
  chunk_residual = residual * (1.0 - par)
  n = lc.bp_count
  total = jnp.sum(n)
  mean = lc.bp_reward_sum / jnp.maximum(n, 1.0)
  fail = lc.bp_failures / (n + 1.0)
  sel = config.selection
  if sel == SelectionStrategy.PERFORMANCE:
    strategy = mean + config.ucb_c * jnp.sqrt(jnp.log(total + 1.0) / (n + 1.0))
  elif sel == SelectionStrategy.STABILITY:
    strategy = mean - fail - cost - repl
  elif sel == SelectionStrategy.ACCURACY:
    strategy = capacity + mean
  elif sel == SelectionStrategy.RISK:
    strategy = mean - 2.0 * fail
  else:  # NOVELTY
    strategy = 1.0 / (1.0 + lc.bp_tries)
  stuck, noise, dead, corr = health_sig
  del stuck
  affinity = (dead[:, None] * (residual * 0.5 * (capacity + par))[None]
              + corr[:, None] * jnp.maximum(repl, par)[None]
              + noise[:, None] * (chunk_residual * (1.0 - 0.5 * capacity))[None])
  return strategy[None] + config.signature_weight * affinity - config.cost_weight * cost[None]


def rollback_commands(seeds):
  """Commands that roll back every in-flight seed (TRAINING ... FINE_TUNING -> ROLLED_BACK) and
  cancel every queued one (GERMINATED -> CANCELLED); same pytree structure as `seeds`.

  Apply them to the seed states restored from the last good checkpoint (docs/design.md, "Rollback").
  """
  _flatten_layers(seeds)

  def one(s: SeedState) -> lifecycle.Commands:
    inflight = lifecycle.stage_in(s.stage, lifecycle.ROLLBACK_STAGES)
    queued = s.stage == Stage.GERMINATED
    op = jnp.where(inflight, Op.ROLLBACK, jnp.where(queued, Op.CANCEL, Op.NONE))
    k = s.num_seeds
    return lifecycle.Commands(op=op.astype(jnp.int32), target=jnp.full((k,), -1, jnp.int32),
                              blueprint=jnp.full((k,), -1, jnp.int32),
                              strategy=jnp.full((k,), -1, jnp.int32))

  return jax.tree.map(one, seeds, is_leaf=_is_seed_state)


def decide(report: EpochReport, seeds, ctrl: ControllerState,
           config: TamiyoConfig = TamiyoConfig()):
  """The policy: one `lifecycle.Commands` per layer and the next `ControllerState`.

  `seeds` are the seed states after `tick_epoch` and `update_readiness`; `report.layers` and
  `ctrl.layers` are keyed like them. Pure and jittable (`config` static); emits only commands
  that `apply_commands` accepts. See the package docstring for the rules; the steps:
  `_emergency` -> `_plateau` -> `_layer_commands` (per layer: safety, culls, recovery,
  advances, promotion) -> `_choose_germinations` (model-wide) -> `_emit_commands` ->
  `_next_controller_state`.
  """
  leaves = _check_inputs(report, seeds, ctrl, config)
  plan = _plan(report, ctrl, leaves, config)
  return _finish(report, ctrl, leaves, plan, plan.chosen, config)


class _Plan(NamedTuple):
  """The heuristic's epoch-end judgement before any command is written (what `decide` and a
  policy that replaces some of its choices, `tamiyo.learned`, share)."""
  emergency: jax.Array
  plateau_epochs: jax.Array
  best_val: jax.Array
  growth_time: jax.Array
  strategy: jax.Array
  partial: list  # per layer: `_layer_commands`' dict
  chosen: list  # per layer: (K,) bool, the heuristic's germinations


def _plan(report, ctrl, leaves, config) -> _Plan:
  seed_leaves, report_leaves, ctrl_leaves, _ = leaves
  emergency = _emergency(report, ctrl, seed_leaves, report_leaves, config)
  plateau_epochs, best_val, growth_time = _plateau(report, ctrl, emergency, config)
  partial = [_layer_commands(s, lr, lc, emergency, config)
             for s, lr, lc in zip(seed_leaves, report_leaves, ctrl_leaves)]
  return _Plan(emergency=emergency, plateau_epochs=plateau_epochs, best_val=best_val,
               growth_time=growth_time, strategy=_grafting_choice(report, ctrl, config),
               partial=partial, chosen=_choose_germinations(partial, growth_time, config))


def _finish(report, ctrl, leaves, plan: _Plan, chosen, config, blueprints=None):
  """`(commands, ctrl)` from a plan and the germinations `chosen` (per layer (K,) bool),
  with `blueprints` per layer (None: the heuristic's, `_heuristic_blueprint`)."""
  seed_leaves, report_leaves, ctrl_leaves, treedef = leaves
  commands, new_layers = _emit_commands(seed_leaves, report_leaves, ctrl_leaves, plan.partial,
                                        chosen, plan.strategy, config, blueprints=blueprints)
  new_ctrl = _next_controller_state(
      report, ctrl, plan.emergency, plan.plateau_epochs, plan.best_val,
      germinated_any=jnp.any(jnp.concatenate(chosen)),
      layers=jax.tree.unflatten(treedef, new_layers), config=config)
  return jax.tree.unflatten(treedef, commands), new_ctrl


def _heuristic_blueprint(lr: LayerReport, lc: LayerControllerState, partial: dict,
                         config: TamiyoConfig) -> jax.Array:
  """(K,) int32: the best-scoring blueprint per seed (scores within `tolerance` of each
  other are tied; ties: the lowest id)."""
  return tolerance.best_index(_blueprint_scores(lr, lc, partial["signature"], config))


def _check_inputs(report, seeds, ctrl, config):
  """Types and shapes, before tracing; returns the per-layer leaves and the layers' treedef."""
  _check_config(config)
  if not isinstance(report, EpochReport):
    raise TypeError(f"report: expected an EpochReport, got {type(report).__name__}")
  if not isinstance(ctrl, ControllerState):
    raise TypeError(f"ctrl: expected a ControllerState, got {type(ctrl).__name__}")
  seed_leaves, treedef = _flatten_layers(seeds)
  report_leaves = _up_to(treedef, report.layers, "report.layers", LayerReport)
  ctrl_leaves = _up_to(treedef, ctrl.layers, "ctrl.layers", LayerControllerState)
  if jnp.shape(ctrl.train_history) != (config.history,):
    raise ValueError(f"ctrl.train_history: expected shape ({config.history},) for this config, "
                     f"got {jnp.shape(ctrl.train_history)}")
  for i, (s, lr, lc) in enumerate(zip(seed_leaves, report_leaves, ctrl_leaves)):
    _check_layer(i, s, lr, lc)
  return seed_leaves, report_leaves, ctrl_leaves, treedef


def _emergency(report, ctrl, seed_leaves, report_leaves, config) -> jax.Array:
  """Whole-model rollback: a non-finite or exploding training loss, or a fossil gone bad."""
  train_loss = jnp.asarray(report.train_loss, jnp.float32)
  recent_train, recent_ok = _recent(ctrl.train_history, ctrl.history_count, config.rollback_window)
  median = _masked_median(recent_train, recent_ok & jnp.isfinite(recent_train))
  exploding = jnp.isfinite(median) & tolerance.greater(train_loss,
                                                       config.rollback_factor * median)
  fossil_bad = jnp.zeros((), bool)
  for s, lr in zip(seed_leaves, report_leaves):
    bad = jnp.asarray(lr.health.nonfinite, bool) | s.nonfinite
    fossil_bad = fossil_bad | jnp.any(bad & (s.stage == Stage.FOSSILIZED))
  return ~jnp.isfinite(train_loss) | exploding | fossil_bad


def _plateau(report, ctrl, emergency, config):
  """`(plateau_epochs, best_val_loss, growth_time)` after this epoch's validation loss."""
  val_loss = jnp.asarray(report.val_loss, jnp.float32)
  val_ok = jnp.isfinite(val_loss) & ~emergency
  # An improvement within float noise of `plateau_min_delta` does not count (`tolerance`).
  improved = val_ok & tolerance.less(val_loss, ctrl.best_val_loss - config.plateau_min_delta)
  plateau_epochs = jnp.where(improved, 0,
                             jnp.where(val_ok, ctrl.plateau_epochs + 1, ctrl.plateau_epochs))
  best_val = jnp.where(val_ok, jnp.minimum(ctrl.best_val_loss, val_loss), ctrl.best_val_loss)
  plateau = plateau_epochs >= config.plateau_patience
  growth_time = ((plateau | config.germinate_without_plateau) & (ctrl.cooldown_left <= 0)
                 & ~emergency)
  return plateau_epochs, best_val, growth_time


def _choose_germinations(partial, growth_time, config) -> list:
  """Per layer, which eligible seeds germinate: the neediest over the whole model (need
  scores within `tolerance` tied, ties to the lower index in the model's layer order), at most
  `max_germinations_per_epoch`."""
  eligible = jnp.concatenate([p["eligible"] for p in partial])
  need = jnp.concatenate([p["need"] for p in partial])
  rank = tolerance.stable_rank(need, eligible)
  budget = (eligible.shape[0] if config.max_germinations_per_epoch is None
            else config.max_germinations_per_epoch)
  chosen = eligible & (rank < budget) & growth_time
  sizes = np.cumsum([0] + [p["need"].shape[0] for p in partial])
  return [chosen[sizes[i]:sizes[i + 1]] for i in range(len(partial))]


def _emit_commands(seed_leaves, report_leaves, ctrl_leaves, partial, chosen, strategy, config,
                   blueprints=None):
  """The layers' `Commands` (GERMINATE with the best-scoring blueprint where chosen, the
  per-layer op elsewhere) and the layers' controller memory after them. `blueprints`: per
  layer (K,) int32 blueprint ids chosen elsewhere (a learned policy's), instead of the
  best-scoring ones."""
  commands, new_layers = [], []
  for i, (s, lr, lc, p, germ) in enumerate(
      zip(seed_leaves, report_leaves, ctrl_leaves, partial, chosen)):
    if blueprints is None:
      blueprint = _heuristic_blueprint(lr, lc, p, config)
    else:
      blueprint = jnp.asarray(blueprints[i], jnp.int32)
    op = jnp.where(germ, Op.GERMINATE, p["op"]).astype(jnp.int32)
    k = s.num_seeds
    layer_strategy = _layer_strategy(strategy, lr, lc, config)
    commands.append(lifecycle.Commands(
        op=op, target=jnp.full((k,), -1, jnp.int32),
        blueprint=jnp.where(germ, blueprint, -1).astype(jnp.int32),
        strategy=jnp.where(germ, layer_strategy, -1).astype(jnp.int32)))
    b = lc.bp_tries.shape[0]
    tries = jnp.sum(jax.nn.one_hot(blueprint, b, dtype=jnp.float32) * germ[:, None], 0)
    sg_tries = jax.nn.one_hot(layer_strategy, lc.sg_tries.shape[0], dtype=jnp.float32) * jnp.sum(
        germ.astype(jnp.float32))
    new_layers.append(lc.replace(
        bp_tries=lc.bp_tries + tries,
        sg_tries=lc.sg_tries + sg_tries,
        germ_health=jnp.where(germ[:, None], _health_matrix(lr.health), lc.germ_health),
        germ_need=jnp.where(germ, p["need"], lc.germ_need)))
  return commands, new_layers


def _next_controller_state(report, ctrl, emergency, plateau_epochs, best_val, *,
                           germinated_any, layers, config) -> ControllerState:
  """The rings (losses, drift, gradient norms of kept epochs), plateau and cooldown clocks."""
  train_loss = jnp.asarray(report.train_loss, jnp.float32)
  keep = ~emergency & jnp.isfinite(train_loss)
  slot = jnp.mod(ctrl.history_count, config.history)
  push = lambda ring, v: jnp.where(keep, ring.at[slot].set(jnp.asarray(v, jnp.float32)), ring)
  return ControllerState(
      train_history=push(ctrl.train_history, train_loss),
      val_history=push(ctrl.val_history, report.val_loss),
      drift_history=push(ctrl.drift_history, report.host_drift),
      grad_history=push(ctrl.grad_history, report.host_grad_norm),
      history_count=ctrl.history_count + keep.astype(jnp.int32),
      best_val_loss=best_val.astype(jnp.float32),
      plateau_epochs=plateau_epochs.astype(jnp.int32),
      cooldown_left=jnp.where(germinated_any, config.germination_cooldown_epochs,
                              jnp.maximum(ctrl.cooldown_left - 1, 0)).astype(jnp.int32),
      rollback_requested=emergency,
      layers=layers)


def _layer_commands(s: SeedState, lr: LayerReport, lc: LayerControllerState,
                    emergency: jax.Array, config: TamiyoConfig):
  """One layer's commands other than GERMINATE, and its germination candidates."""
  lcfg = config.lifecycle
  st = s.stage
  health = lr.health
  sig = _signature(health)
  need = need_score(health, config)
  inflight = lifecycle.stage_in(st, lifecycle.ROLLBACK_STAGES)
  queued = st == Stage.GERMINATED
  training = st == Stage.TRAINING
  ready = s.ready
  bad = jnp.asarray(health.nonfinite, bool) | s.nonfinite

  # A seed left unjudged this epoch (no counterfactual: `max_judged`) keeps its stage: its
  # `ready` is False for want of a measurement, which is no verdict to cull or cancel on.
  judged = ~s.unjudged
  cull = judged & ((training & ~ready & (s.steps_in_stage >= lcfg.max_training_steps))
                   | ((st == Stage.EVALUATING) & (s.epochs_in_stage >= 1) & ~ready)
                   | ((st == Stage.FINE_TUNING) & (s.bad_epochs >= lcfg.fine_tuning_patience)))
  recovered = ((queued | (training & ~ready & judged))
               & tolerance.at_most(need, lc.germ_need - config.recovery_margin))
  advancing_stage = lifecycle.stage_in(
      st, (Stage.TRAINING, Stage.GRAFTING, Stage.STABILIZATION, Stage.EVALUATING,
           Stage.FINE_TUNING, Stage.CULLED, Stage.CANCELLED))
  advance = advancing_stage & ready
  # CULLED -> DORMANT also needs the embargo to be over (its readiness says so; be explicit).
  advance = advance & ~((st == Stage.CULLED) & (s.embargo_left > 0))

  op = jnp.select(
      [inflight & bad, queued & bad, cull, recovered, advance],
      [Op.ROLLBACK, Op.CANCEL, Op.CULL, Op.CANCEL, Op.ADVANCE], Op.NONE).astype(jnp.int32)

  # Promotion from the queue into free training slots (slots per layer).
  still_training = training & (op == Op.NONE)
  slots = s.num_seeds if config.max_concurrent_training is None else config.max_concurrent_training
  free = slots - jnp.sum(still_training.astype(jnp.int32))
  waiting = queued & ready & (op == Op.NONE)  # GERMINATED seeds are always ready
  # Oldest germination first, then the neediest (within `tolerance`), then the lowest index.
  need_rank = tolerance.stable_rank(need, waiting)
  born = jnp.where(waiting, s.germinated_epoch, jnp.iinfo(jnp.int32).max)
  order = jnp.lexsort((need_rank, born))
  queue_rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  promote = waiting & (queue_rank < free)
  op = jnp.where(promote, Op.ADVANCE, op)

  # Emergency: every in-flight seed is rolled back, every queued one cancelled, nothing else.
  op = jnp.where(emergency,
                 jnp.where(inflight, Op.ROLLBACK, jnp.where(queued, Op.CANCEL, Op.NONE)),
                 op).astype(jnp.int32)

  # Germination candidates: DORMANT, no embargo, room in the layer's queue.
  queued_after = jnp.sum((queued & (op == Op.NONE)).astype(jnp.int32))
  queue = s.num_seeds if config.max_queued_per_layer is None else config.max_queued_per_layer
  room = queue - queued_after
  # A layer whose recent children stopped paying grows no more.
  growing = lc.unpaid_streak < config.growth_patience
  candidate = ((st == Stage.DORMANT) & (s.embargo_left <= 0) & (op == Op.NONE)
               & tolerance.at_least(need, config.min_need) & growing)
  eligible = candidate & (tolerance.stable_rank(need, candidate) < room)
  return {"op": op, "eligible": eligible, "need": need, "signature": sig}

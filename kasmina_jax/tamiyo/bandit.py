"""Field reports and the blueprint bandit they feed (`field_reports`, `observe`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import _struct as struct
from kasmina_jax import lifecycle
from kasmina_jax import tolerance
from kasmina_jax.lifecycle import SeedState, Stage
from kasmina_jax.tamiyo.config import REPORTED_STAGES, TamiyoConfig, _check_config
from kasmina_jax.tamiyo.reports import LayerReport, EpochReport, _finite_or, _health_matrix
from kasmina_jax.tamiyo.state import (
    LayerControllerState,
    ControllerState,
    _flatten_layers,
    _up_to,
    _check_layer)


@struct.dataclass
class FieldReports:
  """One layer's field reports of an epoch: leaves (K,) (`valid`: the seed produced one)."""

  valid: jax.Array  # bool: the seed entered a reported stage this epoch
  seed: jax.Array  # int32: seed index within the layer
  blueprint: jax.Array  # int32: blueprint id (-1 if none)
  strategy: jax.Array  # int32: grafting strategy id (-1 if none)
  outcome: jax.Array  # int32 Stage: FOSSILIZED, CULLED, CANCELLED or ROLLED_BACK
  epoch: jax.Array  # int32: the epoch of the report
  germinated_epoch: jax.Array  # int32: the epoch the seed germinated (-1 if unknown)
  stage_epochs: jax.Array  # int32 (K, 11): epochs spent in each stage in this lifecycle
  health_before: jax.Array  # float32 (K, 3): HEALTH_FIELDS at germination (NaN: not by decide)
  health_after: jax.Array  # float32 (K, 3): HEALTH_FIELDS now
  delta: jax.Array  # float32: last counterfactual val_loss(off) - val_loss(on)
  param_count: jax.Array  # int32: the blueprint's parameters
  flops_per_row: jax.Array  # int32: the blueprint's FLOPs per row (the compute-cost figure)
  # float32: variance over the last epoch's learning steps of the child's gradient norm
  # (`telemetry.record_gradients` -> `HealthReport.gradient_variance`; 0 where the child took
  # no learning step in that epoch, NaN where not valid)
  gradient_variance: jax.Array
  param_bytes: jax.Array  # int32: memory of the child's parameters (float32: 4 bytes each)
  # int32: training steps from germination to this report (`SeedState.lifecycle_steps`): the
  # latency of the outcome in steps. No wall-clock latency: it cannot be measured in `jit`.
  lifecycle_steps: jax.Array


def field_reports(old_seeds, new_seeds, report: EpochReport, ctrl: ControllerState):
  """Field reports of the seeds that entered FOSSILIZED, CULLED, CANCELLED or ROLLED_BACK
  between `old_seeds` and `new_seeds` (a pytree of `FieldReports` keyed like the seeds)."""
  old_leaves, treedef = _flatten_layers(old_seeds)
  new_leaves = _up_to(treedef, new_seeds, "new_seeds", SeedState)
  report_leaves = _up_to(treedef, report.layers, "report.layers", LayerReport)
  ctrl_leaves = _up_to(treedef, ctrl.layers, "ctrl.layers", LayerControllerState)
  epoch = jnp.asarray(report.epoch, jnp.int32)
  out = []
  for i, (old, new, lr, lc) in enumerate(zip(old_leaves, new_leaves, report_leaves, ctrl_leaves)):
    if new.num_seeds != old.num_seeds:
      raise ValueError(f"new_seeds: layer {i} has {new.num_seeds} seeds, old_seeds "
                       f"{old.num_seeds}")
    _check_layer(i, new, lr, lc)
    k = new.num_seeds
    valid = (new.stage != old.stage) & lifecycle.stage_in(new.stage, REPORTED_STAGES)
    b = lr.blueprint_params.shape[0]
    has_bp = valid & (new.blueprint >= 0) & (new.blueprint < b)
    bi = jnp.clip(new.blueprint, 0, b - 1)
    out.append(FieldReports(
        valid=valid,
        seed=jnp.arange(k, dtype=jnp.int32),
        blueprint=jnp.where(valid, new.blueprint, -1).astype(jnp.int32),
        strategy=jnp.where(valid, new.strategy, -1).astype(jnp.int32),
        outcome=jnp.where(valid, new.stage, -1).astype(jnp.int32),
        epoch=jnp.broadcast_to(epoch, (k,)),
        germinated_epoch=jnp.where(valid, new.germinated_epoch, -1).astype(jnp.int32),
        stage_epochs=jnp.where(valid[:, None], new.stage_epochs, 0).astype(jnp.int32),
        health_before=jnp.where(valid[:, None], lc.germ_health, jnp.nan),
        health_after=jnp.where(valid[:, None], _health_matrix(lr.health), jnp.nan),
        delta=jnp.where(valid, new.delta, jnp.nan).astype(jnp.float32),
        param_count=jnp.where(has_bp, jnp.asarray(lr.blueprint_params, jnp.int32)[bi], 0),
        flops_per_row=jnp.where(has_bp, jnp.asarray(lr.blueprint_flops, jnp.int32)[bi], 0),
        gradient_variance=jnp.where(valid, jnp.asarray(lr.health.gradient_variance, jnp.float32),
                                    jnp.nan),
        # Children are stored in float32 (`layer.init_children`), as the health report counts.
        param_bytes=jnp.where(has_bp, 4 * jnp.asarray(lr.blueprint_params, jnp.int32)[bi], 0),
        lifecycle_steps=jnp.where(valid, new.lifecycle_steps, 0).astype(jnp.int32)))
  return jax.tree.unflatten(treedef, out)


def observe(ctrl: ControllerState, reports,
            config: TamiyoConfig = TamiyoConfig()) -> ControllerState:
  """Feeds a pytree of `FieldReports` (keyed like the seeds) into the blueprint statistics."""
  _check_config(config)
  if not isinstance(ctrl, ControllerState):
    raise TypeError(f"ctrl: expected a ControllerState, got {type(ctrl).__name__}")
  ctrl_leaves, treedef = jax.tree.flatten(
      ctrl.layers, is_leaf=lambda x: isinstance(x, LayerControllerState))
  report_leaves = _up_to(treedef, reports, "reports", FieldReports)
  new_layers = []
  for lc, r in zip(ctrl_leaves, report_leaves):
    b = lc.bp_count.shape[0]
    outcome = r.outcome
    counted = (r.valid & (r.blueprint >= 0) & (r.blueprint < b)
               & lifecycle.stage_in(outcome, (Stage.FOSSILIZED, Stage.CULLED, Stage.ROLLED_BACK)))
    failed = counted & ((outcome == Stage.CULLED) | (outcome == Stage.ROLLED_BACK))
    base = jnp.select([outcome == Stage.FOSSILIZED, outcome == Stage.CULLED],
                      [config.reward_fossilized, config.reward_culled],
                      config.reward_rolled_back)
    delta = _finite_or(jnp.asarray(r.delta, jnp.float32), 0.0)
    reward = base + config.delta_reward_weight * jnp.tanh(delta / config.delta_reward_scale)
    hot = jax.nn.one_hot(jnp.clip(r.blueprint, 0, b - 1), b, dtype=jnp.float32)
    add = lambda m: jnp.sum(hot * m[:, None], 0)
    # The same outcomes per grafting strategy (the layer's own tuple; ids out of it skipped).
    ns = lc.sg_count.shape[0]
    s_counted = (r.valid & (r.strategy >= 0) & (r.strategy < ns)
                 & lifecycle.stage_in(outcome, (Stage.FOSSILIZED, Stage.CULLED, Stage.ROLLED_BACK)))
    s_failed = s_counted & ((outcome == Stage.CULLED) | (outcome == Stage.ROLLED_BACK))
    s_hot = jax.nn.one_hot(jnp.clip(r.strategy, 0, ns - 1), ns, dtype=jnp.float32)
    s_add = lambda m: jnp.sum(s_hot * m[:, None], 0)
    # Growth stop: a child pays when it fossilized with a counterfactual above pay_margin.
    paid = counted & (outcome == Stage.FOSSILIZED) & tolerance.greater(delta, config.pay_margin)
    unpaid = jnp.sum((counted & ~paid).astype(jnp.int32))
    streak = jnp.where(jnp.any(paid), 0, lc.unpaid_streak + unpaid).astype(jnp.int32)
    new_layers.append(lc.replace(
        unpaid_streak=streak,
        bp_count=lc.bp_count + add(counted.astype(jnp.float32)),
        bp_reward_sum=lc.bp_reward_sum + add(jnp.where(counted, reward, 0.0)),
        bp_failures=lc.bp_failures + add(failed.astype(jnp.float32)),
        sg_count=lc.sg_count + s_add(s_counted.astype(jnp.float32)),
        sg_reward_sum=lc.sg_reward_sum + s_add(jnp.where(s_counted, reward, 0.0)),
        sg_failures=lc.sg_failures + s_add(s_failed.astype(jnp.float32))))
  return ctrl.replace(layers=jax.tree.unflatten(treedef, new_layers))


def _statistics(ctrl: ControllerState, prefix: str):
  """Per layer, plain-Python {count, mean_reward, failures, tries} lists of the statistics
  `prefix`_count, ... ("bp": per blueprint, "sg": per grafting strategy)."""
  def one(lc: LayerControllerState):
    n = np.asarray(getattr(lc, f"{prefix}_count"))
    return {"count": n.tolist(),
            "mean_reward": (np.asarray(getattr(lc, f"{prefix}_reward_sum"))
                            / np.maximum(n, 1.0)).tolist(),
            "failures": np.asarray(getattr(lc, f"{prefix}_failures")).tolist(),
            "tries": np.asarray(getattr(lc, f"{prefix}_tries")).tolist()}
  return jax.tree.map(one, ctrl.layers, is_leaf=lambda x: isinstance(x, LayerControllerState))


def strategy_statistics(ctrl: ControllerState):
  """Per layer, plain-Python grafting-strategy statistics: {count, mean_reward, failures,
  tries} lists, indexed like the layer's strategies."""
  return _statistics(ctrl, "sg")


def blueprint_statistics(ctrl: ControllerState):
  """Per layer, plain-Python bandit statistics: {count, mean_reward, failures, tries} lists."""
  return _statistics(ctrl, "bp")

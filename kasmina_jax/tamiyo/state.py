"""Tamiyo's memory (`ControllerState`, a pytree) and the checks that tie it to the seed states."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from kasmina_jax import _checks
from kasmina_jax import _struct as struct
from kasmina_jax.lifecycle import SeedState
from kasmina_jax.tamiyo.config import (HEALTH_FIELDS, NUM_GRAFTING_STRATEGIES, TamiyoConfig,
                                       _check_config)
from kasmina_jax.tamiyo.reports import LayerReport, _check_health


@struct.dataclass
class LayerControllerState:
  """The controller's memory about one layer."""

  bp_count: jax.Array  # (B,) float32: field reports counted per blueprint
  bp_reward_sum: jax.Array  # (B,) float32: their rewards, summed
  bp_failures: jax.Array  # (B,) float32: culls and rollbacks among them
  bp_tries: jax.Array  # (B,) float32: germinations commanded per blueprint
  sg_count: jax.Array  # (S,) float32: field reports counted per grafting strategy
  sg_reward_sum: jax.Array  # (S,) float32: their rewards, summed
  sg_failures: jax.Array  # (S,) float32: culls and rollbacks among them
  sg_tries: jax.Array  # (S,) float32: germinations commanded per grafting strategy
  germ_health: jax.Array  # (K, 3) float32: HEALTH_FIELDS at the seed's last germination
  germ_need: jax.Array  # (K,) float32: need score at the seed's last germination
  unpaid_streak: jax.Array  # () int32: children in a row that did not pay (see growth_patience)


@struct.dataclass
class ControllerState:
  """All the memory of the controller (a pytree; checkpoint it with the model)."""

  train_history: jax.Array  # (H,) float32 ring buffer of kept epochs' mean training losses
  val_history: jax.Array  # (H,) validation losses of those epochs (NaN if not finite)
  drift_history: jax.Array  # (H,) host weight drift of those epochs
  grad_history: jax.Array  # (H,) host gradient norms of those epochs
  history_count: jax.Array  # () int32: epochs written into the rings (slot = count % H)
  best_val_loss: jax.Array  # () float32
  plateau_epochs: jax.Array  # () int32: epochs in a row without improving by min_delta
  cooldown_left: jax.Array  # () int32: epochs before germination is allowed again
  rollback_requested: jax.Array  # () bool: the last `decide` asked for a checkpoint restore
  layers: Any  # pytree of LayerControllerState keyed like the seeds


def _is_seed_state(x) -> bool:
  return isinstance(x, SeedState)


def _flatten_layers(seeds):
  leaves, treedef = jax.tree.flatten(seeds, is_leaf=_is_seed_state)
  if not leaves:
    raise ValueError("seeds: expected a pytree with at least one SeedState, got none")
  for i, leaf in enumerate(leaves):
    if not isinstance(leaf, SeedState):
      raise TypeError(f"seeds: every leaf must be a SeedState, leaf {i} is "
                      f"{type(leaf).__name__}")
    if len(jnp.shape(leaf.stage)) != 1:
      raise ValueError(f"seeds: leaf {i} has stage shape {jnp.shape(leaf.stage)}; expected "
                       "(num_seeds,) (one SeedState per layer, not stacked)")
  return leaves, treedef


def _up_to(treedef, tree, name: str, kind: type):
  try:
    items = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name}: expected the same layer structure as seeds ({treedef}): {e}") from None
  for i, item in enumerate(items):
    if not isinstance(item, kind):
      raise TypeError(f"{name}: layer {i} is a {type(item).__name__}, expected {kind.__name__}")
  return items


def _per_layer(name: str, value, treedef, n: int) -> list:
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return [value] * n
  try:
    return treedef.flatten_up_to(value)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name}: expected an int or a pytree of ints keyed like seeds, "
                     f"got {value!r}: {e}") from None


def init_controller(seeds, num_blueprints, config: TamiyoConfig = TamiyoConfig(),
                    num_strategies=NUM_GRAFTING_STRATEGIES) -> ControllerState:
  """A fresh `ControllerState` for the seed-state pytree `seeds`.

  `num_blueprints`, `num_strategies`: the catalog size and the number of grafting strategies
  (`len` of the layer's `grafting_strategies`), each an int for every layer or a pytree of
  ints keyed like `seeds`.
  """
  _check_config(config)
  leaves, treedef = _flatten_layers(seeds)
  counts = _per_layer("num_blueprints", num_blueprints, treedef, len(leaves))
  strategies = _per_layer("num_strategies", num_strategies, treedef, len(leaves))
  layer_states = []
  for i, (leaf, b, ns) in enumerate(zip(leaves, counts, strategies)):
    b = _checks.positive_int(f"num_blueprints[{i}]", b)
    ns = _checks.positive_int(f"num_strategies[{i}]", ns)
    k = leaf.num_seeds
    zb = jnp.zeros((b,), jnp.float32)
    zs = jnp.zeros((ns,), jnp.float32)
    layer_states.append(LayerControllerState(
        bp_count=zb, bp_reward_sum=zb, bp_failures=zb, bp_tries=zb,
        sg_count=zs, sg_reward_sum=zs, sg_failures=zs, sg_tries=zs,
        germ_health=jnp.full((k, len(HEALTH_FIELDS)), jnp.nan, jnp.float32),
        germ_need=jnp.zeros((k,), jnp.float32), unpaid_streak=jnp.zeros((), jnp.int32)))
  h = config.history
  nan_h = jnp.full((h,), jnp.nan, jnp.float32)
  return ControllerState(
      train_history=nan_h, val_history=nan_h, drift_history=nan_h, grad_history=nan_h,
      history_count=jnp.zeros((), jnp.int32),
      best_val_loss=jnp.full((), jnp.inf, jnp.float32),
      plateau_epochs=jnp.zeros((), jnp.int32),
      cooldown_left=jnp.zeros((), jnp.int32),
      rollback_requested=jnp.zeros((), bool),
      layers=jax.tree.unflatten(treedef, layer_states))


def _check_layer(i: int, s: SeedState, lr: LayerReport, lc: LayerControllerState) -> None:
  k = s.num_seeds
  _check_health(lr.health, k, f"report.layers[{i}].health")
  b = jnp.shape(lr.blueprint_params)
  if len(b) != 1 or b[0] < 1:
    raise ValueError(f"report.layers[{i}].blueprint_params: expected shape (B,), B >= 1, got {b}")
  for f in ("blueprint_flops", "blueprint_replacement", "blueprint_parallel"):
    if jnp.shape(getattr(lr, f)) != b:
      raise ValueError(f"report.layers[{i}].{f}: expected shape {b}, got "
                       f"{jnp.shape(getattr(lr, f))}")
  if jnp.shape(lc.bp_count) != b:
    raise ValueError(f"ctrl.layers[{i}]: statistics for {jnp.shape(lc.bp_count)[0]} blueprints, "
                     f"the report's catalog has {b[0]}")
  s_names = len(lr.strategy_names)
  if jnp.shape(lc.sg_count) != (s_names,):
    raise ValueError(f"ctrl.layers[{i}]: statistics for {jnp.shape(lc.sg_count)[0]} grafting "
                     f"strategies, the report's layer has {s_names} ({lr.strategy_names})")
  if jnp.shape(lc.germ_need) != (k,):
    raise ValueError(f"ctrl.layers[{i}].germ_need: expected shape ({k},), got "
                     f"{jnp.shape(lc.germ_need)}")

"""What Tamiyo sees at an epoch end: per-layer reports (health + catalog costs) and the model's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kasmina_jax import _struct as struct
from kasmina_jax import telemetry
from kasmina_jax.tamiyo.config import GRAFTING_STRATEGY_NAMES, HEALTH_FIELDS


@struct.dataclass
class LayerReport:
  """One Kasmina layer's end-of-epoch view: its health and its catalog's static costs."""

  health: telemetry.HealthReport  # leaves (K,)
  blueprint_params: jax.Array  # (B,) int32 parameter count per blueprint
  blueprint_flops: jax.Array  # (B,) int32 FLOPs per row per blueprint
  blueprint_replacement: jax.Array  # (B,) bool: kind == "replacement"
  blueprint_parallel: jax.Array  # (B,) bool: wiring == "parallel"
  # The names of the layer's grafting strategies (static; a seed's `strategy` indexes them).
  strategy_names: tuple[str, ...] = struct.field(pytree_node=False,
                                                 default=GRAFTING_STRATEGY_NAMES)

  @property
  def num_blueprints(self) -> int:
    return int(jnp.shape(self.blueprint_params)[-1])


def layer_report(spec, health: telemetry.HealthReport,
                 strategy_names=GRAFTING_STRATEGY_NAMES) -> LayerReport:
  """A `LayerReport` with the catalog arrays of `spec` (a `layer.KasminaSpec`) and the names
  of the layer's grafting strategies (`grafting.strategy_names` of the layer's tuple)."""
  from kasmina_jax import layer as layer_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(spec, layer_lib.KasminaSpec):
    raise TypeError(f"spec: expected a KasminaSpec, got {type(spec).__name__}")
  if not isinstance(health, telemetry.HealthReport):
    raise TypeError(f"health: expected a telemetry.HealthReport, got {type(health).__name__}")
  _check_health(health, spec.num_seeds, "health")
  if (isinstance(strategy_names, str) or not isinstance(strategy_names, (tuple, list))
      or not strategy_names or not all(isinstance(n, str) and n for n in strategy_names)):
    raise TypeError(f"strategy_names: expected a non-empty tuple of names, got {strategy_names!r}")
  if len(set(strategy_names)) != len(strategy_names):
    raise ValueError(f"strategy_names: expected distinct names, got {strategy_names!r}")
  cat = spec.catalog
  return LayerReport(
      health=health,
      blueprint_params=jnp.asarray(cat.param_count, jnp.int32),
      blueprint_flops=jnp.asarray(cat.flops_per_row, jnp.int32),
      blueprint_replacement=jnp.asarray(~cat.residual),
      blueprint_parallel=jnp.asarray(cat.parallel),
      strategy_names=tuple(strategy_names),
  )


@struct.dataclass
class EpochReport:
  """What the controller sees at an epoch end."""

  layers: Any  # pytree of LayerReport, keyed like the seed-state pytree
  train_loss: jax.Array  # () mean training loss of the epoch (may be NaN / inf)
  val_loss: jax.Array  # () validation loss with the seeds as they are
  host_grad_norm: jax.Array  # () mean host-only gradient norm this epoch
  host_drift: jax.Array  # () relative host weight drift this epoch
  epoch: jax.Array  # () int32


def _finite_or(x: jax.Array, value: float) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, value)


def _health_matrix(health: telemetry.HealthReport) -> jax.Array:
  """(K, 3) float32: HEALTH_FIELDS side by side."""
  return jnp.stack([jnp.asarray(getattr(health, f), jnp.float32) for f in HEALTH_FIELDS], -1)


def _check_health(health: telemetry.HealthReport, k: int, name: str) -> None:
  for f in HEALTH_FIELDS + ("nonfinite",):
    shape = jnp.shape(getattr(health, f))
    if shape != (k,):
      raise ValueError(f"{name}.{f}: expected shape ({k},), got {shape}")

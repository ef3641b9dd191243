"""kasmina_jax: morphogenetic neural networks in JAX.

A Kasmina layer splits a layer's activations into chunks, each owned by a *seed* that
monitors its health and, when Tamiyo (the controller) commands it, grows a small child network
through an 11-stage gated lifecycle. Everything is a pure function over pytrees.

Modules: `lifecycle`, `grafting`, `blueprints`, `telemetry`, `layer` (the `jnp` reference),
`kernels` (Pallas / Triton), `tamiyo`, `nn` (Flax Linen), `nnx` (Flax NNX), `optim` (optax),
`training`, `experiments`, `datasets`, `export` (a grown model as plain Flax and StableHLO;
imported on first use); optional: `checkpoint` (orbax), `events`, `plots` (matplotlib),
`distributed` (meshes).
"""

from kasmina_jax import blueprints
from kasmina_jax import datasets
from kasmina_jax import distributed
from kasmina_jax import experiments
from kasmina_jax import grafting
from kasmina_jax import kernels
from kasmina_jax import layer
from kasmina_jax import lifecycle
from kasmina_jax import nn
from kasmina_jax import nnx
from kasmina_jax import optim
from kasmina_jax import tamiyo
from kasmina_jax import telemetry
from kasmina_jax import training
from kasmina_jax.blueprints import Blueprint, ChildParams, default_blueprints
from kasmina_jax.grafting import (
    DEFAULT_STRATEGIES,
    STRATEGY_NAMES,
    GraftingConfig,
    GraftingStrategy,
    GraftSignals,
    grafting_step,
)
from kasmina_jax.layer import KasminaSpec, StepAux, forward, health_report
from kasmina_jax.lifecycle import (
    LEGAL_TRANSITIONS,
    Commands,
    LifecycleConfig,
    Op,
    SeedState,
    Stage,
    apply_commands,
    cancel_germination,
    init_seed_state,
    make_commands,
    no_commands,
    request_germination,
    tick_epoch,
    tick_step,
    update_readiness,
)
from kasmina_jax.nn import KasminaDense, KasminaLayer
from kasmina_jax.tamiyo import EpochReport, SelectionStrategy, TamiyoConfig, decide
from kasmina_jax.telemetry import HealthReport

__version__ = "0.1.0"

_LAZY = ("export", "export_model")


def __getattr__(name):
  # `kasmina_jax.export` on first use: it is not needed to train, so `import kasmina_jax`
  # does not pay for it.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f"kasmina_jax.{name}")
  raise AttributeError(f"module 'kasmina_jax' has no attribute {name!r}")


__all__ = [
    "DEFAULT_STRATEGIES", "STRATEGY_NAMES", "tick_epoch", "tick_step",
    "Blueprint", "ChildParams", "Commands", "EpochReport", "GraftSignals", "GraftingConfig",
    "GraftingStrategy", "HealthReport", "KasminaDense", "KasminaLayer", "KasminaSpec",
    "LEGAL_TRANSITIONS", "LifecycleConfig", "Op", "SeedState", "SelectionStrategy", "Stage",
    "StepAux", "TamiyoConfig", "apply_commands", "blueprints", "cancel_germination", "decide",
    "default_blueprints", "forward", "grafting", "grafting_step", "health_report",
    "init_seed_state", "layer", "lifecycle", "make_commands", "nn", "no_commands", "optim",
    "request_germination", "tamiyo", "telemetry", "update_readiness", "datasets",
    "distributed", "experiments", "kernels", "nnx", "training", "export", "export_model",
]

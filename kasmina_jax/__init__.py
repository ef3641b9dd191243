"""kasmina_jax: morphogenetic neural networks in JAX.

A Kasmina layer splits a layer's activations into chunks, each owned by a *seed* that
monitors its health and, when Tamiyo (the controller) commands it, grows a small child network
through an 11-stage gated lifecycle. Everything is a pure function over pytrees.

Modules: `lifecycle`, `grafting`, `blueprints`, `telemetry`, `layer` (the `jnp` reference),
`kernels` (Pallas / Triton), `tamiyo`, `optim` (optax), `orchestration` (the seeds' per-step
and per-epoch sequence over every layer, framework-free); loaded on first use (they import
Flax or more): `linen` (Flax Linen; `nn` is its old name, kept one release), `nnx` (Flax NNX),
`training` (re-exports `steps`, `loop`, `losses`), `experiments`, `datasets`, `distributed`
(meshes), `export` (a grown model as plain Flax and StableHLO); optional: `checkpoint`
(orbax), `events`, `plots` (matplotlib).
"""

import importlib

from kasmina_jax import blueprints
from kasmina_jax import grafting
from kasmina_jax import kernels
from kasmina_jax import layer
from kasmina_jax import lifecycle
from kasmina_jax import optim
from kasmina_jax import tamiyo
from kasmina_jax import telemetry
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
from kasmina_jax.tamiyo import EpochReport, SelectionStrategy, TamiyoConfig, decide
from kasmina_jax.telemetry import HealthReport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STRATEGIES", "STRATEGY_NAMES", "tick_epoch", "tick_step",
    "Blueprint", "ChildParams", "Commands", "EpochReport", "GraftSignals", "GraftingConfig",
    "GraftingStrategy", "HealthReport", "KasminaDense", "KasminaLayer", "KasminaSpec",
    "LEGAL_TRANSITIONS", "LifecycleConfig", "Op", "SeedState", "SelectionStrategy", "Stage",
    "StepAux", "TamiyoConfig", "apply_commands", "blueprints", "cancel_germination", "decide",
    "default_blueprints", "forward", "grafting", "grafting_step", "health_report",
    "init_seed_state", "layer", "lifecycle", "linen", "make_commands", "nn", "no_commands", "optim",
    "request_germination", "tamiyo", "telemetry", "update_readiness", "datasets",
    "distributed", "experiments", "kernels", "nnx", "training", "export", "export_model",
    "steps", "loop", "losses", "orchestration",
]

# The shells (Flax Linen / NNX), the loop, experiment drivers, data sets and meshes load on
# first access (`kasmina_jax.linen`, `kasmina_jax.KasminaDense`): `import kasmina_jax` and the
# framework-free core (`kasmina_jax.optim`, ...) then never import Flax (docs/design.md,
# "Layering"), and experiments / data sets cost nothing until used.
_LAZY_MODULES = ("datasets", "distributed", "experiments", "export", "export_model", "linen",
                 "nn", "nnx", "training", "steps", "loop", "losses", "orchestration")
_LAZY_NAMES = {"KasminaDense": "linen", "KasminaLayer": "linen"}


def __getattr__(name):
  if name in _LAZY_MODULES:
    return importlib.import_module(f"kasmina_jax.{name}")
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"kasmina_jax.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module 'kasmina_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_MODULES) | set(_LAZY_NAMES))

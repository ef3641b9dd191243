"""Flax Linen layers: thin shells over the functional core.

Where things live in a Linen model's variables:

- `params[...layer...]["children"]`: the layer's `ChildParams` (ordinary parameters);
- `kasmina[...layer...]["state"]`: a `KasminaVars` (seed states and telemetry accumulators,
  with the layer's static `KasminaSpec` riding along as pytree metadata);
- `kasmina_aux[...layer...]["step"]`: the last training pass's `StepAux` (child loss, per-seed
  objective, non-finite flags), written when that collection is mutable;
- `kasmina_eval[...layer...]["eval_alpha"]` (optional input): per-seed evaluation blend
  weights; when present the layer runs an evaluation pass (no telemetry).

`find_layers` walks those collections, so the training loop needs no registry; `seed_states`
turns a collection into the `{layer path: SeedState}` map the framework-free modules
(`optim`, ...) take.

The module is named `linen` so that `from kasmina_jax import linen` does not shadow the usual
`import flax.linen as nn` (`kasmina_jax.nn` stays as an alias for one release).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import grafting as graft_lib
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import orchestration as orch
from kasmina_jax import sequence as seq_lib
from kasmina_jax import telemetry as tel_lib

__all__ = [
    "KASMINA", "KASMINA_AUX", "KASMINA_EVAL", "KasminaAttention", "KasminaBlocks",
    "KasminaDense", "KasminaLayer", "KasminaVars",
    "StepSummary", "children_path", "current_eval_alpha", "eval_alpha_tree", "find_layers",
    "get_path", "init_layer_vars", "layer_slots", "map_layers", "seed_states", "set_path",
    "with_slots",
]

KASMINA = "kasmina"
KASMINA_AUX = "kasmina_aux"
KASMINA_EVAL = "kasmina_eval"


@struct.dataclass
class KasminaVars:
  """One layer's non-parameter state; `spec` and `strategies` (the layer's grafting
  strategies) are static metadata (part of the treedef)."""

  seeds: lifecycle.SeedState
  telemetry: tel_lib.TelemetryState
  spec: layer_lib.KasminaSpec = struct.field(pytree_node=False)
  strategies: tuple = struct.field(pytree_node=False, default=graft_lib.DEFAULT_STRATEGIES)
  # Static knowledge of the stages (`orchestration.LayerSlot.live`): None, False or True.
  live: bool | None = struct.field(pytree_node=False, default=None,
                                   metadata={"derived": True})


KasminaVars.replace = orch.replace_keeping_live_honest


@struct.dataclass
class StepSummary:
  """What a training pass reports per layer (differentiable `child_loss`)."""

  child_loss: jax.Array
  objective: jax.Array
  recon_ratio: jax.Array
  nonfinite: jax.Array


def init_layer_vars(spec: layer_lib.KasminaSpec,
                    strategies: tuple = graft_lib.DEFAULT_STRATEGIES) -> KasminaVars:
  return KasminaVars(seeds=lifecycle.init_seed_state(spec.num_seeds),
                     telemetry=layer_lib.init_telemetry(spec), spec=spec,
                     strategies=graft_lib.check_strategies(strategies, "grafting_strategies"))


class KasminaLayer(nn.Module):
  """A chunked Kasmina layer over the last axis of `x` (place it after any Dense, Conv or
  attention output). Pass `u`, the wrapped host layer's input, for parallel-wired
  blueprints (see `KasminaDense`).

  `grafting_strategies`: the strategies this layer's seeds may graft with (a tuple of
  `grafting.Strategy` functions, named by `__name__`; default `grafting.DEFAULT_STRATEGIES`).
  A seed's `strategy` is an id into it; Tamiyo chooses among them and the train step's alpha
  update runs them."""

  num_seeds: int
  blueprints: tuple[bp_lib.Blueprint, ...] = bp_lib.default_blueprints()
  grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES
  corr_rows: int = 256
  trust_penalty: float = 1.0
  dead_eps: float = tel_lib.DEAD_EPS
  impl: str = "auto"
  telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY
  precision: Any = None  # child matmuls: None (JAX's default), "highest", a lax.Precision
  context: int = 0  # sequence children: the context their per-token FLOPs are reported at

  def spec_for(self, x: jax.Array, u: jax.Array | None) -> layer_lib.KasminaSpec:
    needs_u = any(b.wiring == "parallel" for b in self.blueprints)
    return layer_lib.make_spec(
        x.shape[-1], self.num_seeds, tuple(self.blueprints),
        input_dim=(u.shape[-1] if (u is not None and needs_u) else None),
        corr_rows=self.corr_rows, dead_eps=self.dead_eps, trust_penalty=self.trust_penalty,
        telemetry_every=self.telemetry_every, context=self.context)

  @nn.compact
  def __call__(self, x: jax.Array, u: jax.Array | None = None, *, train: bool = True):
    spec = self.spec_for(x, u)
    if not spec.catalog.any_parallel:
      u = None
    children = self.param("children", lambda _key: layer_lib.init_children(spec))
    strategies = graft_lib.check_strategies(self.grafting_strategies, "grafting_strategies")
    state = self.variable(KASMINA, "state", init_layer_vars, spec, strategies)
    if state.value.spec != spec:
      raise ValueError(f"{self.name}: stored KasminaSpec {state.value.spec} does not match "
                       f"this call's {spec} (input width or settings changed)")
    if state.value.strategies != strategies:
      raise ValueError(f"{self.name}: stored grafting strategies "
                       f"{graft_lib.strategy_names(state.value.strategies)} do not match this "
                       f"layer's grafting_strategies {graft_lib.strategy_names(strategies)}")
    eval_alpha = None
    if self.has_variable(KASMINA_EVAL, "eval_alpha"):
      eval_alpha = self.get_variable(KASMINA_EVAL, "eval_alpha")
    take_telemetry = (train and eval_alpha is None and not self.is_initializing()
                      and self.is_mutable_collection(KASMINA))
    out, aux = layer_lib.forward(
        spec, children, state.value.seeds, x, u=u,
        telemetry=state.value.telemetry if take_telemetry else None,
        eval_alpha=eval_alpha, impl=self.impl, precision=self.precision,
        live=state.value.live)
    if take_telemetry:
      state.value = state.value.replace(telemetry=aux.telemetry)
    if self.is_mutable_collection(KASMINA_AUX):
      self.put_variable(KASMINA_AUX, "step", StepSummary(
          child_loss=aux.child_loss, objective=aux.objective, recon_ratio=aux.recon_ratio,
          nonfinite=aux.nonfinite))
    return out


class KasminaDense(nn.Module):
  """`Dense` host layer and its activation, wrapped by a Kasmina layer.

  The Kasmina layer sits AFTER the activation, so its chunks (what telemetry watches and what
  chunk-wired children read) are the host's activations: dead ReLUs show in
  `dead_node_ratio` (docs/design.md, "Telemetry"). Parallel-wired children read the
  Dense's input `u` and add to their chunk of those activations, like added width. With no
  live child the output is `activation(Dense(u))`, as before.
  """

  features: int
  num_seeds: int
  blueprints: tuple[bp_lib.Blueprint, ...] = bp_lib.default_blueprints()
  grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES
  activation: Callable[[jax.Array], jax.Array] | None = None
  corr_rows: int = 256
  trust_penalty: float = 1.0
  impl: str = "auto"
  telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY
  precision: Any = None

  @nn.compact
  def __call__(self, u: jax.Array, *, train: bool = True):
    h = nn.Dense(self.features, name="host")(u)
    if self.activation is not None:
      h = self.activation(h)
    return KasminaLayer(num_seeds=self.num_seeds, blueprints=self.blueprints,
                        grafting_strategies=self.grafting_strategies, corr_rows=self.corr_rows,
                        trust_penalty=self.trust_penalty, impl=self.impl,
                        telemetry_every=self.telemetry_every, precision=self.precision,
                        name="kasmina")(h, u=u, train=train)


def _sequence_seeds(site: nn.Module) -> KasminaLayer:
  """The `KasminaLayer` (named "kasmina") of a `KasminaAttention` / `KasminaBlocks` site,
  from the site's own settings; sequence children run under XLA (`impl="reference"`)."""
  return KasminaLayer(num_seeds=site.num_seeds, blueprints=site.blueprints,
                      grafting_strategies=site.grafting_strategies, corr_rows=site.corr_rows,
                      trust_penalty=site.trust_penalty, impl="reference",
                      telemetry_every=site.telemetry_every, precision=site.precision,
                      context=site.context, name="kasmina")


class KasminaAttention(nn.Module):
  """Causal multi-head self-attention (the host, `nn.MultiHeadDotProductAttention` named
  "host") with a layer of head seeds beside it (head growth, `kasmina_jax.sequence`).

  `u` `(..., T, D)` is the attention's input (normalised by the caller, as in a pre-norm
  block); each seed can grow `sequence.SequenceBlueprint(site="heads")` children: extra causal
  heads that read `u` and add to the host attention's output, their output projection zero
  at germination. With no live seed the output is the host attention's.
  """

  num_heads: int
  num_seeds: int
  blueprints: tuple = seq_lib.head_blueprints()
  qkv_features: int | None = None
  grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES
  corr_rows: int = 256
  trust_penalty: float = 1.0
  telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY
  precision: Any = None
  context: int = 0

  @nn.compact
  def __call__(self, u: jax.Array, *, train: bool = True):
    mask = nn.make_causal_mask(jnp.ones(u.shape[:-1], jnp.int32))
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.qkv_features,
                                        name="host")(u, u, mask=mask)
    return _sequence_seeds(self)(h, u=u, train=train)


class KasminaBlocks(nn.Module):
  """A site on the residual stream `x` `(..., T, D)` where up to `num_seeds` whole blocks
  may grow (depth growth, `sequence.SequenceBlueprint(site="block")`): each seed's child is a
  pre-norm residual block, `x + Attn(LN(x)) + MLP(LN(x))`, output layers zero at
  germination. With no live seed the site is the identity. Put one between two host blocks
  (or after the last)."""

  num_seeds: int
  blueprints: tuple = seq_lib.block_blueprints()
  grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES
  corr_rows: int = 256
  trust_penalty: float = 1.0
  telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY
  precision: Any = None
  context: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = True):
    return _sequence_seeds(self)(x, train=train)


# ------------------------------------------------------------------------------ tree helpers


def _is_vars(x) -> bool:
  return isinstance(x, KasminaVars)


def find_layers(kasmina: Any) -> dict[tuple, KasminaVars]:
  """`{path: KasminaVars}` for every Kasmina layer in a `kasmina` collection.

  `path` is the tuple of keys down to the layer's module (without the trailing "state").
  """
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(kasmina, is_leaf=_is_vars)[0]:
    if isinstance(leaf, KasminaVars):
      keys = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
      found[keys[:-1]] = leaf
  return found


def seed_states(kasmina: Any) -> dict[tuple, lifecycle.SeedState]:
  """`{layer path: SeedState}` of a `kasmina` collection: the map `optim` takes, so that the
  optimizer code needs no Flax (docs/design.md, "Layering")."""
  return {path: v.seeds for path, v in find_layers(kasmina).items()}


def layer_slots(kasmina: Any) -> dict[tuple, orch.LayerSlot]:
  """`{layer path: orchestration.LayerSlot}` of a `kasmina` collection: what the
  framework-free orchestration (per-step update, epoch commit, rollback) works on."""
  return {path: orch.LayerSlot(seeds=v.seeds, telemetry=v.telemetry, spec=v.spec,
                               strategies=v.strategies, live=v.live)
          for path, v in find_layers(kasmina).items()}


def with_slots(kasmina: Any, slots: dict[tuple, orch.LayerSlot]) -> Any:
  """`kasmina` with each layer's seeds and telemetry taken from `slots` (`layer_slots`' map,
  after the orchestration updated it)."""
  layers = find_layers(kasmina)
  if set(slots) != set(layers):
    raise ValueError(f"slots: expected the layers {sorted(layers, key=str)}, "
                     f"got {sorted(slots, key=str)}")
  out = kasmina
  for path, slot in slots.items():
    out = set_path(out, path + ("state",),
                   layers[path].replace(seeds=slot.seeds, telemetry=slot.telemetry,
                                        live=slot.live))
  return out


# Plain nested-mapping access: the orchestration's (one copy, framework-free).
get_path = orch.get_path
set_path = orch.set_path


def map_layers(fn: Callable[[KasminaVars], KasminaVars], kasmina: Any) -> Any:
  """Applies `fn` to every layer's `KasminaVars`."""
  return jax.tree.map(lambda v: fn(v) if isinstance(v, KasminaVars) else v, kasmina,
                      is_leaf=_is_vars)


children_path = orch.children_path


def eval_alpha_tree(kasmina: Any, fn: Callable[[tuple, KasminaVars], jax.Array]) -> Any:
  """A `kasmina_eval` collection: `{...path...: {"eval_alpha": fn(path, vars)}}`."""
  out: dict = {}
  for path, v in find_layers(kasmina).items():
    node = out
    for key in path:
      node = node.setdefault(key, {})
    node["eval_alpha"] = fn(path, v)
  return out


def current_eval_alpha(seeds: lifecycle.SeedState) -> jax.Array:
  """Evaluation weights that reproduce a layer's training-time blend ("as is")."""
  s = seeds.stage
  full_on = (s >= lifecycle.Stage.STABILIZATION) & (s <= lifecycle.Stage.FOSSILIZED)
  return jnp.where(full_on, 1.0, jnp.where(s == lifecycle.Stage.GRAFTING, seeds.alpha, 0.0))

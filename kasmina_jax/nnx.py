"""Flax NNX layers: thin shells over the functional core (the NNX twins of `kasmina_jax.nn`).

Where things live in an NNX model:

- `layer.children`: a `Children` module with one `nnx.Param` per `ChildParams` field (leading
  axis `num_seeds`), ordinary parameters: `nnx.grad`, `nnx.Optimizer` and `kasmina_jax.optim`
  see them under `layer path + ("children",)`, the Linen layers' convention. (Per-field, not
  one `nnx.Param(ChildParams)`: `nnx.Optimizer.update` writes its state back through
  `nnx.state`, which would turn a dataclass value into a `State` and break the next step.)
- `layer.seeds`: a `SeedVar` holding the seeds' `lifecycle.SeedState`;
- `layer.telemetry`: a `TelemetryVar` holding the epoch's `telemetry.TelemetryState`;
- `layer.last_step`: a `StepSummaryVar` holding the last training pass's `nn.StepSummary`
  (differentiable `child_loss`: add `child_loss(model)` to the task loss inside the loss
  function, after the forward pass);
- `layer.spec`: the static `layer.KasminaSpec` (NNX is eager, so it is built at construction).

Training passes (`model.train()`, the default) take telemetry and write the step summary;
evaluation passes (`model.eval()`, `deterministic=True`, or an `eval_alpha` argument) mutate
nothing, so they run under `nnx.vmap` / `jax.vmap` over a batch with the model broadcast.

The helpers at the bottom read and replace the seed states of every Kasmina layer of a model
(`seed_states`, `set_seed_states`, `commit_seed_states`), so an end-of-epoch function can run
`lifecycle.apply_commands` on them, germinate or discard children and reset their optimizer
state (`optim.reset_children`) in one place.

To train through the shared loop instead (`training.fit`, with the same counterfactuals,
Tamiyo decisions, commit and rollback as a Linen model): `state = create_train_state(model,
optax.adam(1e-3), key)`, `state, history = training.fit(state, ...)`, then
`update_model(model, state)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import chunks
from kasmina_jax import grafting as graft_lib
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax import optim
from kasmina_jax import orchestration as orch
from kasmina_jax import sequence as seq_lib
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.nn import StepSummary


class SeedVar(nnx.Variable):
  """A Kasmina layer's seed states (`lifecycle.SeedState`)."""


class TelemetryVar(nnx.Variable):
  """A Kasmina layer's telemetry accumulators (`telemetry.TelemetryState`)."""


class StepSummaryVar(nnx.Variable):
  """The last training pass's `nn.StepSummary` of a Kasmina layer."""


class Children(nnx.Module):
  """A layer's children: one `nnx.Param` per field of its children record
  (`blueprints.ChildParams`, or `sequence.SequenceChildParams` for sequence children)."""

  def __init__(self, params):
    self.record = type(params)
    self.fields = tuple(f.name for f in dataclasses.fields(params))
    for name in self.fields:
      setattr(self, name, nnx.Param(getattr(params, name)))

  def get(self):
    return self.record(**{name: getattr(self, name).get_value() for name in self.fields})

  def set(self, params) -> None:
    for name in self.fields:
      getattr(self, name).set_value(getattr(params, name))


def init_step_summary(num_seeds: int) -> StepSummary:
  nan = jnp.full((num_seeds,), jnp.nan, jnp.float32)
  return StepSummary(child_loss=jnp.zeros((), jnp.float32), objective=nan, recon_ratio=nan,
                     nonfinite=jnp.zeros((num_seeds,), bool))


class KasminaLayer(nnx.Module):
  """A chunked Kasmina layer over the last axis of its input (width `dim`).

  `input_dim`: width of the wrapped host layer's input, needed by parallel-wired blueprints
  (pass `u` to `__call__` then; see `KasminaDense`). `grafting_strategies`: the strategies its
  seeds may graft with (a tuple of `grafting.Strategy` functions named by `__name__`; default
  `grafting.DEFAULT_STRATEGIES`; a seed's `strategy` is an id into it). `rngs`: if given, the
  layer keeps its own `germinate` key stream, used by `commit_seed_states` when no key is
  passed. Children start empty (no seed holds one), so construction draws no random numbers.
  """

  def __init__(self, dim: int, num_seeds: int, *,
               blueprints: tuple[bp_lib.Blueprint, ...] = bp_lib.default_blueprints(),
               grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES,
               input_dim: int | None = None, corr_rows: int = 256, trust_penalty: float = 1.0,
               dead_eps: float = tel_lib.DEAD_EPS, impl: str = "auto",
               telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY,
               precision=None, context: int = 0, rngs: nnx.Rngs | None = None):
    if impl not in layer_lib.IMPLS:
      raise ValueError(f"impl: expected one of {layer_lib.IMPLS}, got {impl!r}")
    self.precision = chunks.canonical_precision(precision)
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs: expected nnx.Rngs or None, got {type(rngs).__name__}")
    self.spec = layer_lib.make_spec(
        dim, num_seeds, tuple(blueprints), input_dim=input_dim, corr_rows=corr_rows,
        dead_eps=dead_eps, trust_penalty=trust_penalty, telemetry_every=telemetry_every,
        context=context)
    self.grafting_strategies = graft_lib.check_strategies(grafting_strategies,
                                                          "grafting_strategies")
    self.impl = impl
    self.deterministic = False
    self.children = Children(layer_lib.init_children(self.spec))
    self.seeds = SeedVar(lifecycle.init_seed_state(num_seeds))
    self.telemetry = TelemetryVar(layer_lib.init_telemetry(self.spec))
    self.last_step = StepSummaryVar(init_step_summary(num_seeds))
    self.rngs = nnx.Rngs(germinate=rngs.params()) if rngs is not None else None
    # Set on a merged copy by `NnxModel.apply` (the shared training loop): a per-seed
    # evaluation blend for calls that pass none (the model's own `__call__` does not forward
    # one), and whether evaluation passes write `last_step` (the epoch end reads recon_ratio).
    self.default_eval_alpha = None
    self.record_eval = False
    # Static knowledge of the stages (`layer.forward`'s `live`), set by `NnxModel.apply` from
    # the train state (`training.refresh_liveness`); None (decided on the device) otherwise.
    self.live = None

  def __call__(self, x: jax.Array, u: jax.Array | None = None, *,
               eval_alpha: jax.Array | None = None,
               deterministic: bool | None = None) -> jax.Array:
    """`x` (..., dim) -> same shape. `eval_alpha` (scalar or per seed) runs an evaluation
    pass with that blend (0 = seed off, 1 = fully on, also for a seed still in TRAINING)."""
    spec = self.spec
    if not spec.catalog.any_parallel:
      u = None
    deterministic = self.deterministic if deterministic is None else deterministic
    if eval_alpha is None:
      eval_alpha = self.default_eval_alpha
    training_pass = not deterministic and eval_alpha is None
    out, aux = layer_lib.forward(
        spec, self.children.get(), self.seeds.get_value(), x, u=u,
        telemetry=self.telemetry.get_value() if training_pass else None,
        eval_alpha=eval_alpha, impl=self.impl, precision=self.precision, live=self.live)
    if training_pass:
      self.telemetry.set_value(aux.telemetry)
    if training_pass or self.record_eval:
      self.last_step.set_value(StepSummary(
          child_loss=aux.child_loss, objective=aux.objective, recon_ratio=aux.recon_ratio,
          nonfinite=aux.nonfinite))
    return out


class KasminaDense(nnx.Module):
  """`nnx.Linear` host layer and its activation, wrapped by a Kasmina layer after the
  activation (as the Linen `KasminaDense`: telemetry and chunk-wired children see the host's
  activations; parallel-wired children read the Linear's input and add to their chunk)."""

  def __init__(self, in_features: int, features: int, num_seeds: int, *,
               blueprints: tuple[bp_lib.Blueprint, ...] = bp_lib.default_blueprints(),
               grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES,
               activation: Callable[[jax.Array], jax.Array] | None = None,
               corr_rows: int = 256, trust_penalty: float = 1.0,
               dead_eps: float = tel_lib.DEAD_EPS, impl: str = "auto",
               telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY,
               precision=None, rngs: nnx.Rngs):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs: expected nnx.Rngs, got {type(rngs).__name__}")
    needs_u = any(b.wiring == "parallel" for b in blueprints)
    self.host = nnx.Linear(in_features, features, rngs=rngs)
    self.kasmina = KasminaLayer(
        features, num_seeds, blueprints=blueprints, grafting_strategies=grafting_strategies,
        input_dim=in_features if needs_u else None, corr_rows=corr_rows,
        trust_penalty=trust_penalty, dead_eps=dead_eps, impl=impl,
        telemetry_every=telemetry_every, precision=precision, rngs=rngs)
    self.activation = activation

  def __call__(self, u: jax.Array, *, eval_alpha: jax.Array | None = None,
               deterministic: bool | None = None) -> jax.Array:
    h = self.host(u)
    if self.activation is not None:
      h = self.activation(h)
    return self.kasmina(h, u=u, eval_alpha=eval_alpha, deterministic=deterministic)


class KasminaAttention(nnx.Module):
  """Causal multi-head self-attention (`nnx.MultiHeadAttention`, the host, as `host`) with a
  layer of head seeds beside it (the NNX twin of `linen.KasminaAttention`): `u`
  `(..., T, in_features)` is the attention's (normalised) input; head children read it and
  add to the host's output."""

  def __init__(self, in_features: int, num_heads: int, num_seeds: int, *,
               blueprints: tuple = seq_lib.head_blueprints(),
               grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES,
               corr_rows: int = 256, trust_penalty: float = 1.0,
               telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY, precision=None,
               context: int = 0, rngs: nnx.Rngs):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs: expected nnx.Rngs, got {type(rngs).__name__}")
    self.host = nnx.MultiHeadAttention(num_heads=num_heads, in_features=in_features,
                                       decode=False, rngs=rngs)
    self.kasmina = KasminaLayer(
        in_features, num_seeds, blueprints=blueprints, grafting_strategies=grafting_strategies,
        input_dim=in_features, corr_rows=corr_rows, trust_penalty=trust_penalty,
        impl="reference", telemetry_every=telemetry_every, precision=precision,
        context=context, rngs=rngs)

  def __call__(self, u: jax.Array, *, eval_alpha: jax.Array | None = None,
               deterministic: bool | None = None) -> jax.Array:
    mask = nnx.make_causal_mask(jnp.ones(u.shape[:-1], jnp.int32))
    h = self.host(u, mask=mask, deterministic=True)
    return self.kasmina(h, u=u, eval_alpha=eval_alpha, deterministic=deterministic)


class KasminaBlocks(nnx.Module):
  """A site on the residual stream where up to `num_seeds` whole blocks may grow (the NNX
  twin of `linen.KasminaBlocks`); the identity while no seed is live."""

  def __init__(self, dim: int, num_seeds: int, *,
               blueprints: tuple = seq_lib.block_blueprints(),
               grafting_strategies: tuple = graft_lib.DEFAULT_STRATEGIES,
               corr_rows: int = 256, trust_penalty: float = 1.0,
               telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY, precision=None,
               context: int = 0, rngs: nnx.Rngs | None = None):
    self.kasmina = KasminaLayer(
        dim, num_seeds, blueprints=blueprints, grafting_strategies=grafting_strategies,
        corr_rows=corr_rows, trust_penalty=trust_penalty, impl="reference",
        telemetry_every=telemetry_every, precision=precision, context=context, rngs=rngs)

  def __call__(self, x: jax.Array, *, eval_alpha: jax.Array | None = None,
               deterministic: bool | None = None) -> jax.Array:
    return self.kasmina(x, eval_alpha=eval_alpha, deterministic=deterministic)


# ------------------------------------------------------------------------------ model helpers


# Compiled once per shape: these run at epoch ends, often outside any jit.
_install_seeds = jax.jit(orch.install_seeds, static_argnames=("reset_telemetry",))
_health_report = jax.jit(layer_lib.health_report, static_argnums=0)


@jax.jit
def _reset_opt_state(opt_state, params, old_states, new_states):
  return optim.reset_children(opt_state, params, optim.reset_mask(params, old_states, new_states))


def find_layers(model: nnx.Module) -> dict[tuple, KasminaLayer]:
  """`{path: KasminaLayer}` for every Kasmina layer in `model` (paths as in `nnx.state`)."""
  return {tuple(path): m for path, m in nnx.iter_modules(model) if isinstance(m, KasminaLayer)}


def seed_states(model: nnx.Module) -> dict[tuple, lifecycle.SeedState]:
  """`{layer path: SeedState}` of every Kasmina layer (what `optim.learning_mask` and
  `optim.reset_mask` accept as their `kasmina` argument)."""
  return {p: layer.seeds.get_value() for p, layer in find_layers(model).items()}


def telemetry_states(model: nnx.Module) -> dict[tuple, tel_lib.TelemetryState]:
  return {p: layer.telemetry.get_value() for p, layer in find_layers(model).items()}


def step_summaries(model: nnx.Module) -> dict[tuple, StepSummary]:
  return {p: layer.last_step.get_value() for p, layer in find_layers(model).items()}


def child_loss(model: nnx.Module) -> jax.Array:
  """Sum over layers of the last training pass's `child_loss` (add it to the task loss)."""
  total = jnp.zeros((), jnp.float32)
  for layer in find_layers(model).values():
    total = total + layer.last_step.get_value().child_loss
  return total


def health_reports(model: nnx.Module) -> dict[tuple, tel_lib.HealthReport]:
  """End-of-epoch `HealthReport` of every Kasmina layer (from its telemetry and seed state)."""
  return {p: _health_report(layer.spec, layer.telemetry.get_value(), layer.seeds.get_value())
          for p, layer in find_layers(model).items()}


def reset_telemetry(model: nnx.Module) -> None:
  """Fresh telemetry accumulators in every Kasmina layer (start of an epoch)."""
  for layer in find_layers(model).values():
    layer.telemetry.set_value(tel_lib.reset(layer.telemetry.get_value()))


def _check_states(layers: dict[tuple, KasminaLayer], states: dict[tuple, Any]) -> None:
  if set(states) != set(layers):
    raise ValueError(f"states: expected one SeedState per Kasmina layer {sorted(layers, key=str)}, "
                     f"got {sorted(states, key=str)}")
  for p, s in states.items():
    if not isinstance(s, lifecycle.SeedState):
      raise TypeError(f"states[{p}]: expected a SeedState, got {type(s).__name__}")
    old = layers[p].seeds.get_value()
    want = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), old)
    got = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), s)
    if want != got:
      raise ValueError(f"states[{p}]: shapes/dtypes {got} do not match the layer's {want}")


def set_seed_states(model: nnx.Module, states: dict[tuple, lifecycle.SeedState]) -> None:
  """Replaces the seed states of every Kasmina layer (no children or optimizer changes; see
  `commit_seed_states` for the end-of-epoch path)."""
  layers = find_layers(model)
  _check_states(layers, states)
  for p, s in states.items():
    layers[p].seeds.set_value(s)


def learning_mask(model: nnx.Module, wrt: Any = nnx.Param, *, fossil: str = "integrated") -> Any:
  """`optim.learning_mask` for an NNX model: a tree shaped like the params the optimizer sees
  (`nnx.as_pure(nnx.state(model, wrt))`); pass it as
  `optimizer.update(model, grads, learn_mask=learning_mask(model))`."""
  params = nnx.as_pure(nnx.state(model, wrt))
  return optim.learning_mask(params, seed_states(model), fossil=fossil)


def reset_optimizer_children(optimizer: nnx.Optimizer, model: nnx.Module,
                             old_states: dict[tuple, lifecycle.SeedState]) -> None:
  """Zeroes the optimizer state of the children whose seed changed from `old_states` to the
  model's current states in a way that (re)initialises or discards the child."""
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  new = _reset_opt_state(nnx.as_pure(optimizer.opt_state), params, old_states,
                         seed_states(model))
  # Write the values back Variable by Variable (the optimizer state's own structure).
  is_var = lambda x: isinstance(x, nnx.Variable)
  variables, treedef = jax.tree.flatten(optimizer.opt_state, is_leaf=is_var)
  for var, value in zip(variables, treedef.flatten_up_to(new)):
    if is_var(var):
      var.set_value(value)


def commit_seed_states(model: nnx.Module, new_states: dict[tuple, lifecycle.SeedState], *,
                       key: jax.Array | None = None,
                       optimizer: nnx.Optimizer | None = None) -> dict[tuple, jax.Array]:
  """End of epoch, after `lifecycle.apply_commands`: install `new_states`, give germinated
  seeds fresh children and zero the children of culled / cancelled / rolled-back / dormant
  ones (`layer.reinit_children`), and reset those children's optimizer state.

  `key`: germination key (split per layer); without it each layer draws from its own
  `germinate` stream (the layer needs `rngs` then). Returns `{layer path: (K,) changed}`.
  """
  layers = find_layers(model)
  _check_states(layers, new_states)
  old_states = seed_states(model)
  paths = sorted(layers, key=str)
  keys = dict(zip(paths, jax.random.split(key, len(paths)))) if key is not None else {}
  for p in paths:
    if key is None:
      if layers[p].rngs is None:
        raise ValueError(f"key: the layer at {p} has no rngs of its own; pass key=")
      keys[p] = layers[p].rngs.germinate()
  # The orchestration's install step (the one `training` commits with), over the children.
  children = {}
  for p, layer in layers.items():
    children = _set_nested(children, orch.children_path(p), layer.children.get())
  slots, children, _ = _install_seeds(layer_slots(model), children, None, old_states,
                                      dict(new_states), keys=keys, reset_telemetry=False)
  for p, layer in layers.items():
    layer.children.set(orch.get_children(children, p))
    layer.seeds.set_value(slots[p].seeds)
  if optimizer is not None:
    reset_optimizer_children(optimizer, model, old_states)
  return {p: layer_lib.changed_children(old_states[p].stage, new_states[p].stage)
          for p in paths}


def layer_slots(model: nnx.Module) -> dict[tuple, orch.LayerSlot]:
  """`{layer path: orchestration.LayerSlot}` of every Kasmina layer of `model` (the map the
  framework-free orchestration works on, as `linen.layer_slots`)."""
  return {p: orch.LayerSlot(seeds=layer.seeds.get_value(), telemetry=layer.telemetry.get_value(),
                            spec=layer.spec, strategies=layer.grafting_strategies)
          for p, layer in find_layers(model).items()}


def kasmina_optimizer(model: nnx.Module, inner: optax.GradientTransformation, *,
                      max_grad_norm: float | None = None, wrt: Any = nnx.Param) -> nnx.Optimizer:
  """`nnx.Optimizer(model, optim.kasmina_optimizer(inner, ...), wrt=wrt)`; update it with
  `optimizer.update(model, grads, learn_mask=learning_mask(model))`."""
  return nnx.Optimizer(model, optim.kasmina_optimizer(inner, max_grad_norm=max_grad_norm),
                       wrt=wrt)


# ------------------------------------------------------------------- the shared training loop


_KASMINA_VARS = (SeedVar, TelemetryVar, StepSummaryVar)
# The model's state that is neither a parameter nor a Kasmina layer's seeds / telemetry /
# step summary: BatchNorm statistics, Dropout and other RNG streams, user variables.
_OTHER_STATE = nnx.Not(nnx.Any(nnx.Param, *_KASMINA_VARS))


def _other_state(model: nnx.Module) -> dict:
  """`model`'s state that is not a parameter or a Kasmina layer's, as a pure dict."""
  return nnx.as_pure(nnx.state(model, _OTHER_STATE)).to_pure_dict()


class NnxModel:
  """An NNX model seen through Linen's `apply` contract, so that `kasmina_jax.training`
  (`train_step`, `epoch_transition`, `fit`, rollback) trains it with the same code as a Linen
  model, through the same framework-free orchestration.

  The model is split once: its `nnx.Param`s become `TrainState.params` (a pure dict; the
  children under `layer path + ("children",)` as field mappings), its Kasmina layers' seeds
  and telemetry a Linen-shaped `kasmina` collection (`{...path...: {"state": KasminaVars}}`),
  and the rest of its state (BatchNorm statistics, RNG streams such as Dropout's, any other
  `nnx.Variable`) the collection `STATE` of `TrainState.model_state`, a pure dict that every
  training pass updates as Linen's mutable collections are (evaluation passes read it). Every
  `apply` merges a fresh copy, sets it to training or evaluation mode (`deterministic`,
  `use_running_average`, as `nnx.Module.train()` / `eval()`), runs it and reads the state
  back. The loop draws germination keys from `TrainState.rng`. Compared by identity (a
  static field of the jitted train state).
  """

  STATE = "nnx_state"

  def __init__(self, model: nnx.Module):
    if not isinstance(model, nnx.Module):
      raise TypeError(f"model: expected an nnx.Module, got {type(model).__name__}")
    if not find_layers(model):
      raise ValueError("model: found no Kasmina layer (kasmina_jax.nnx.KasminaLayer) in it")
    self.graphdef, params, self.kasmina_template, other = nnx.split(
        model, nnx.Param, _KASMINA_VARS, ...)
    self.params_template = params
    self.state_template = other
    self.initial_params = nnx.as_pure(params).to_pure_dict()
    self.initial_state = nnx.as_pure(other).to_pure_dict()

  def model_state(self, model: nnx.Module) -> dict:
    """`TrainState.model_state` of `model`: `{STATE: its other state}` (empty if none)."""
    state = _other_state(model)
    return {self.STATE: state} if jax.tree.leaves(state) else {}

  def kasmina_collection(self, model: nnx.Module) -> dict:
    """The Linen-shaped `kasmina` collection of `model`'s Kasmina layers."""
    from kasmina_jax import linen as kln  # pylint: disable=g-import-not-at-top
    out: dict = {}
    for path, layer in find_layers(model).items():
      out = _set_nested(out, path + ("state",), kln.KasminaVars(
          seeds=layer.seeds.get_value(), telemetry=layer.telemetry.get_value(),
          spec=layer.spec, strategies=layer.grafting_strategies))
    return out

  def merge(self, params: Any, state: Any = None) -> nnx.Module:
    """A fresh copy of the model holding `params` (a pure dict like `initial_params`) and its
    other state `state` (a pure dict like `initial_state`; None: the initial one)."""
    pstate = nnx.clone(self.params_template)
    nnx.replace_by_pure_dict(pstate, params)
    other = nnx.clone(self.state_template)
    if state is not None:
      nnx.replace_by_pure_dict(other, state)
    # copy: fresh Variables in the caller's trace (the held ones belong to the outer one).
    return nnx.merge(self.graphdef, pstate, self.kasmina_template, other, copy=True)

  def apply(self, variables: dict, x: jax.Array, *, train: bool = True, mutable=()):
    """Linen's `apply`: `variables` holds "params", "kasmina", optionally "kasmina_eval"
    (per layer `eval_alpha`) and `STATE`; returns `(out, mutated)`, `mutated` holding those
    of "kasmina", "kasmina_aux" and `STATE` that are in `mutable`."""
    from kasmina_jax import linen as kln  # pylint: disable=g-import-not-at-top
    model = self.merge(variables["params"], variables.get(self.STATE))
    model.set_attributes(deterministic=not train, use_running_average=not train,
                         raise_if_not_found=False)
    kasmina = variables[kln.KASMINA]
    evals = variables.get(kln.KASMINA_EVAL)
    layers = find_layers(model)
    for path, layer in layers.items():
      v = kln.get_path(kasmina, path + ("state",))
      layer.seeds.set_value(v.seeds)
      layer.telemetry.set_value(v.telemetry)
      layer.record_eval = True
      layer.live = v.live
      if evals is not None:
        layer.default_eval_alpha = nnx.data(kln.get_path(evals, path)["eval_alpha"])
    out = model(x)
    mutated = {}
    if kln.KASMINA in mutable:
      # A pass changes no stage: the static `live` read for these stages still holds.
      slots = {p: s.replace(live=layers[p].live) for p, s in layer_slots(model).items()}
      mutated[kln.KASMINA] = kln.with_slots(kasmina, slots)
    if kln.KASMINA_AUX in mutable:
      aux: dict = {}
      for p, l in layers.items():
        aux = _set_nested(aux, p + ("step",), l.last_step.get_value())
      mutated[kln.KASMINA_AUX] = aux
    if self.STATE in mutable:
      mutated[self.STATE] = _other_state(model)
    return out, mutated

  def update_model(self, model: nnx.Module, params: Any, kasmina: Any,
                   model_state: dict | None = None) -> None:
    """Writes trained `params`, the seeds / telemetry of `kasmina` and the other state of
    `model_state` (`TrainState.model_state`) into `model` (the module this wrapper was built
    from, or one with the same structure)."""
    from kasmina_jax import linen as kln  # pylint: disable=g-import-not-at-top
    merged = self.merge(params, (model_state or {}).get(self.STATE))
    nnx.update(model, nnx.state(merged, nnx.Param), nnx.state(merged, _OTHER_STATE))
    for path, layer in find_layers(model).items():
      v = kln.get_path(kasmina, path + ("state",))
      layer.seeds.set_value(v.seeds)
      layer.telemetry.set_value(v.telemetry)


def _set_nested(tree: dict, path: tuple, value: Any) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _set_nested(tree.get(path[0], {}), path[1:], value)}


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                       key: jax.Array, config: Any = None, *,
                       max_grad_norm: float | None = None,
                       metric_names: tuple[str, ...] = ("accuracy",)):
  """A `training.TrainState` over an NNX model (its current parameters and seed states), for
  `training.fit` / `train_step` / `end_of_epoch`. `key` is split as the Linen
  `training.create_train_state` splits it (the second half drives germination), so the same
  key gives both shells the same germination draws. Write the result back into the model
  with `update_model(model, state)`."""
  from kasmina_jax import training  # pylint: disable=g-import-not-at-top
  config = training.TrainConfig() if config is None else config
  wrapped = NnxModel(model)
  _, rng = jax.random.split(key)
  return training.new_train_state(
      wrapped, wrapped.initial_params, wrapped.kasmina_collection(model), optimizer, rng,
      config, max_grad_norm=max_grad_norm, metric_names=metric_names,
      model_state=wrapped.model_state(model))


def update_model(model: nnx.Module, state: Any) -> None:
  """Installs a trained `training.TrainState`'s params, seed states and other state
  (`model_state`: BatchNorm statistics, RNG streams) into `model`."""
  if not isinstance(state.model, NnxModel):
    raise TypeError(f"state: expected a TrainState over an NnxModel, got model "
                    f"{type(state.model).__name__}")
  state.model.update_model(model, state.params, state.kasmina, state.model_state)

"""Export a grown model: a plain Flax model (Linen and NNX) and a serialized JAX function.

`export(source)` reads a trained Linen `training.TrainState` or an NNX model built from
`kasmina_jax.nnx` layers and returns an `Exported`: a `export_model.ModelSpec` and the
parameters of `export_model.GrownModel` (Linen) / `GrownModelNNX` (NNX), with the children
folded into ordinary layers and every empty slot dropped. The exported model computes the
Kasmina model's evaluation pass as it is (Linen `train=False`, NNX `model.eval()`):

- a FOSSILIZED chunk-wired child becomes a small branch on its chunk (`x + f(x)` residual,
  `f(x)` replacement: its chunk's map is replaced);
- a FOSSILIZED parallel-wired child becomes extra hidden width of the wrapped `Dense` (its
  first layer joins the host kernel as more columns; its second layer maps those units onto
  its chunk, before the activation);
- seeds in DORMANT, GERMINATED, CULLED, CANCELLED or ROLLED_BACK contribute `x`: dropped.

Seeds in flight (TRAINING .. FINE_TUNING). With `include="fossilized"` (the default) they are
an error naming the layer and the seeds: the model is not finished growing. With
`include="live"` the exporter folds what the evaluation pass computes, exactly: children fully
on (STABILIZATION, EVALUATING, FINE_TUNING) fold like fossils; a GRAFTING child, whose chunk
is `(1 - alpha) x + alpha g(x)`, folds with its current alpha (its output layer scaled by
alpha; a replacement child becomes a residual branch with a `-alpha x` diagonal term);
TRAINING children, whose chunk is still `x`, are dropped. The export depends only on the
seeds' stages (and alpha) and the parameters, so how fossils trained (`fossil="integrated"`
or `"frozen"`) does not matter.

Supported structure: a chain of `KasminaDense` (`kasmina_jax.nn` or `kasmina_jax.nnx`) and
plain `Dense` / `nnx.Linear` layers, each layer's output fed unchanged to the next and the
last one's returned, nonlinearities given as `KasminaDense(activation=...)` (one of
`export_model.ACTIVATIONS`). Anything else (a function or another module between layers, a
bare `KasminaLayer`, a reshaped input, a convolution, an embedding, attention) raises a
ValueError naming the first layer or module it cannot fold, before that module runs on the
probe input (where it would fail with Flax's own shape error).

The exported model's apply function serializes with `jax.export` (`Exported.serialize`), and
`Exported.save(directory)` writes everything a plain Flax user needs, with no `kasmina_jax`
import (see the README, "Export").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kasmina_jax import export_model as em
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import nnx as knx
from kasmina_jax import training
from kasmina_jax.lifecycle import Stage

INCLUDE = ("fossilized", "live")
# The seeds' weights in an export (shared with `export_lm`, the transformer's export).
from kasmina_jax._fold import IN_FLIGHT, fold_weights  # pylint: disable=g-import-not-at-top,g-bad-import-order

_KNOWN_ACTIVATIONS = (
    (jax.nn.relu, "relu"), (jax.nn.gelu, "gelu"), (jnp.tanh, "tanh"), (jax.nn.tanh, "tanh"),
    (jax.nn.sigmoid, "sigmoid"), (jax.nn.silu, "silu"), (jax.nn.swish, "silu"),
    (jax.nn.elu, "elu"), (jax.nn.softplus, "softplus"), (jax.nn.leaky_relu, "leaky_relu"),
)


def activation_name(fn, where: str) -> str | None:
  """The `export_model.ACTIVATIONS` name of a host activation (None for none)."""
  if fn is None:
    return None
  if isinstance(fn, functools.partial) and fn.func is jax.nn.gelu and not fn.args:
    if set(fn.keywords) == {"approximate"}:
      return "gelu" if fn.keywords["approximate"] else "gelu_exact"
  for known, name in _KNOWN_ACTIVATIONS:
    if fn is known:
      return name
  raise ValueError(f"{where}: activation {fn!r} is not one the exported model knows; use one "
                   f"of {sorted(em.ACTIVATIONS)} (jax.nn / flax.linen functions)")


# ------------------------------------------------------------------------- the model's chain


@dataclasses.dataclass
class _Host:
  """One traced layer of the Kasmina model, as plain numbers."""

  path: tuple
  kernel: np.ndarray
  bias: np.ndarray | None
  activation: str | None
  spec: Any = None  # layer.KasminaSpec for a KasminaDense, None for a plain Dense
  children: Any = None  # blueprints.ChildParams
  seeds: Any = None  # lifecycle.SeedState

  @property
  def label(self) -> str:
    return "/".join(map(str, self.path))


def _check_chain(calls, x, out, where: str) -> None:
  """Each recorded layer reads the previous one's output; the model returns the last's."""
  if not calls:
    raise ValueError(f"{where}: found no Dense or KasminaDense layer in the model")
  prev, prev_label = x, "the model's input"
  for label, inp, outp in calls:
    if inp is not prev:
      raise ValueError(
          f"{where}: layer {label} does not read {prev_label} unchanged (a function or module "
          "between them?); export supports chains of KasminaDense / Dense layers with their "
          "activations given as KasminaDense(activation=...)")
    prev, prev_label = outp, f"layer {label}'s output"
  if out is not prev:
    raise ValueError(f"{where}: the model does not return {prev_label} unchanged (a function "
                     "or module after it?)")


def _np(a) -> np.ndarray:
  return np.asarray(jax.device_get(a), np.float32)


class _Unsupported(Exception):
  """The first module of a traced model that export cannot fold (raised before it runs)."""


_CANNOT_FOLD = ("export folds chains of KasminaDense / Dense layers (nnx.Linear in NNX) with "
                "their activations given as KasminaDense(activation=...); it cannot fold ")


def _unsupported_error(what: str) -> ValueError:
  return ValueError(f"model: {_CANNOT_FOLD}{what}")


def _trace_linen(model: nn.Module, params, kasmina, input_dim: int) -> list[_Host]:
  calls, hosts, stack = [], [], []

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not mod.path:
      return next_fun(*args, **kwargs)
    top = not stack
    is_layer = isinstance(mod, (nn.Dense, knn.KasminaDense))
    if top and not is_layer:
      # Before it runs: on the probe input a convolution or an embedding would fail with
      # Flax's own shape error, which names nothing export can act on.
      raise _Unsupported(f"{type(mod).__name__} at {'/'.join(mod.path)}")
    stack.append(mod)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    if top and is_layer:
      calls.append(("/".join(mod.path), args[0] if args else None, out))
      hosts.append(mod)
    return out

  def run(x):
    with nn.intercept_methods(interceptor):
      out = model.apply({"params": params, knn.KASMINA: kasmina}, x, train=False)
    _check_chain(calls, x, out, "model")
    return out

  try:
    jax.eval_shape(run, jax.ShapeDtypeStruct((2, input_dim), jnp.float32))
  except _Unsupported as e:
    raise _unsupported_error(str(e)) from None
  layers = knn.find_layers(kasmina)
  covered = set()
  out = []
  for mod in hosts:
    path = tuple(mod.path)
    if isinstance(mod, knn.KasminaDense):
      lv = layers.get(path + ("kasmina",))
      if lv is None:
        raise ValueError(f"model: no kasmina state for the KasminaDense at {'/'.join(path)}")
      covered.add(path + ("kasmina",))
      host = knn.get_path(params, path + ("host",))
      out.append(_Host(path, _np(host["kernel"]), _np(host["bias"]) if "bias" in host else None,
                       activation_name(mod.activation, f"layer {'/'.join(path)}"), lv.spec,
                       knn.get_path(params, path + ("kasmina", "children")), lv.seeds))
    else:
      p = knn.get_path(params, path)
      if np.ndim(p["kernel"]) != 2:
        raise ValueError(f"model: Dense at {'/'.join(path)} has a kernel of shape "
                         f"{np.shape(p['kernel'])}; export supports 2-D kernels")
      out.append(_Host(path, _np(p["kernel"]), _np(p["bias"]) if "bias" in p else None, None))
  stray = set(layers) - covered
  if stray:
    raise ValueError(f"model: Kasmina layers outside a KasminaDense are not supported by "
                     f"export: {sorted('/'.join(map(str, p)) for p in stray)}")
  return out


@contextlib.contextmanager
def _record_nnx_calls(calls: list):
  """Records the top-level `nnx.Linear` / `KasminaDense` calls (NNX has no interceptors, so
  the two `__call__`s are wrapped for the duration of one call)."""
  depth = [0]
  originals = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, knx.KasminaDense)}

  def wrap(orig):
    def call(self, x, *args, **kwargs):
      depth[0] += 1
      try:
        out = orig(self, x, *args, **kwargs)
      finally:
        depth[0] -= 1
      if depth[0] == 0:
        calls.append((self, x, out))
      return out
    return call

  try:
    for cls, orig in originals.items():
      cls.__call__ = wrap(orig)
    yield
  finally:
    for cls, orig in originals.items():
      cls.__call__ = orig


def _first_unsupported_nnx(model: nnx.Module) -> str | None:
  """The outermost module holding parameters that export cannot fold (a convolution, an
  embedding, attention, a normalisation, ...), by path; None if there is none. Read from
  the module tree before anything runs: on the probe input such a module would fail with
  Flax's own shape error. Containers of supported layers are walked into."""
  modules = [(tuple(p), m) for p, m in nnx.iter_modules(model)]
  supported = (nnx.Linear, knx.KasminaDense)
  inside = [p for p, m in modules if isinstance(m, (knx.KasminaDense, knx.KasminaLayer))]
  has_layer = lambda path: any(q[:len(path)] == path and isinstance(m, supported)
                               for q, m in modules)
  found = []
  for path, m in modules:
    if not path or isinstance(m, supported + (knx.KasminaLayer,)):
      continue
    if any(path[:len(q)] == q for q in inside):
      continue
    if not jax.tree.leaves(nnx.state(m, nnx.Param)) or has_layer(path):
      continue
    found.append((path, m))
  outer = [(p, m) for p, m in found if not any(q != p and p[:len(q)] == q for q, _ in found)]
  if not outer:
    return None
  order = _definition_order(model)
  path, m = min(outer, key=lambda pm: (order.get(id(pm[1]), len(order)), tuple(map(str, pm[0]))))
  return f"{type(m).__name__} at {'/'.join(map(str, path))}"


def _definition_order(model: nnx.Module) -> dict[int, int]:
  """`id(module) -> rank` in the order the modules were assigned (`nnx.iter_modules` sorts by
  name; assignment order is usually the order of the calls, so "first" means what a reader
  of the model's `__init__` expects)."""
  order, seen = {}, set()

  def walk(obj):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    if isinstance(obj, nnx.Module):
      order.setdefault(id(obj), len(order))
      children = vars(obj).values()
    elif isinstance(obj, (list, tuple)):
      children = obj
    elif isinstance(obj, dict):
      children = obj.values()
    else:
      return
    for child in children:
      walk(child)

  walk(model)
  return order


def _nnx_input_dim(model: nnx.Module) -> int:
  shapes = []
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.Linear) and isinstance(m.in_features, int):
      shapes.append((m.in_features, m.out_features))
  return _chain_input_dim(shapes)


def _trace_nnx(model: nnx.Module, input_dim: int) -> list[_Host]:
  model = nnx.clone(model)
  model.eval()
  paths = {id(m): tuple(p) for p, m in nnx.iter_modules(model)}
  calls = []

  def run(x):
    # Abstract (no compute): an evaluation pass mutates nothing, so no tracer leaks.
    del calls[:]
    with _record_nnx_calls(calls):
      out = model(x)
    _check_chain([("/".join(map(str, paths.get(id(m), ("?",)))), i, o) for m, i, o in calls],
                 x, out, "model")
    return out

  jax.eval_shape(run, jax.ShapeDtypeStruct((2, input_dim), jnp.float32))
  for _, m in nnx.iter_modules(model):
    if isinstance(m, knx.KasminaLayer) and not any(
        isinstance(c, knx.KasminaDense) and c.kasmina is m for c, _, _ in calls):
      raise ValueError(f"model: Kasmina layers outside a KasminaDense are not supported by "
                       f"export: {'/'.join(map(str, paths[id(m)]))}")
  hosts = []
  for m, _, _ in calls:
    path = paths[id(m)]
    lin = m.host if isinstance(m, knx.KasminaDense) else m
    if not isinstance(lin.in_features, int) or not isinstance(lin.out_features, int):
      raise ValueError(f"model: Linear at {'/'.join(map(str, path))} is not a 2-D Linear")
    kernel, bias = _np(lin.kernel[...]), (_np(lin.bias[...]) if lin.bias is not None else None)
    if isinstance(m, knx.KasminaDense):
      k = m.kasmina
      hosts.append(_Host(path, kernel, bias,
                         activation_name(m.activation, f"layer {'/'.join(map(str, path))}"),
                         k.spec, k.children.get(), k.seeds.get_value()))
    else:
      hosts.append(_Host(path, kernel, bias, None))
  return hosts


# ------------------------------------------------------------------------------------ folding


def _fold_layer(host: _Host, name: str, include: str) -> tuple[em.LayerSpec, dict]:
  din, dout = host.kernel.shape
  if host.spec is None:
    layer = em.LayerSpec(name=name, in_features=din, features=dout, activation=host.activation,
                         use_bias=host.bias is not None)
    params = {"kernel": host.kernel}
    if host.bias is not None:
      params["bias"] = host.bias
    return layer, params

  spec, cat = host.spec, host.spec.catalog
  weights = fold_weights(host.seeds, include, host.label)
  blueprint = np.clip(np.asarray(host.seeds.blueprint), 0, spec.num_blueprints - 1)
  cp = jax.tree.map(_np, host.children)
  children, child_params = [], {}
  extra_kernel, extra_bias = [], []
  for k in range(spec.num_seeds):
    w = float(weights[k])
    if w == 0.0:
      continue
    bp = spec.blueprints[int(blueprint[k])]
    off, c = spec.chunk_offsets[k], spec.chunk_sizes[k]
    h = int(cat.hidden_mask[int(blueprint[k])].sum())
    leaves = [cp.w2[k, :h, :c], cp.b2[k, :c]]
    if bp.wiring == "parallel":
      leaves += [cp.w1u[k, :, :h], cp.b1[k, :h]]
    elif h:
      leaves += [cp.w1[k, :c, :h], cp.b1[k, :h]]
    if bp.glu:
      leaves += [cp.wg[k, :c, :h], cp.bg[k, :h]]
    if bp.diagonal:
      leaves.append(cp.s[k, :c])
    if not all(np.isfinite(a).all() for a in leaves):
      raise ValueError(f"layer {host.label}: seed {k}'s child has non-finite parameters; "
                       "the Kasmina model shows it as identity, the export cannot fold it")
    scale = (lambda a: a) if w == 1.0 else (lambda a: (np.float32(w) * a).astype(np.float32))
    if bp.wiring == "parallel":
      children.append(em.ChildSpec(seed=k, offset=off, width=c, wiring="parallel", hidden=h,
                                   activation=bp.activation))
      extra_kernel.append((off, cp.w1u[k, :, :h]))
      extra_bias.append((off, cp.b1[k, :h]))
      child_params[f"child{k}"] = {"kernel": scale(cp.w2[k, :h, :c]), "bias": scale(cp.b2[k, :c])}
      continue
    residual, diagonal = bp.kind == "residual", bp.diagonal
    p = {}
    if h:
      p["up"] = {"kernel": cp.w1[k, :c, :h], "bias": cp.b1[k, :h]}
      if bp.glu:
        p["gate"] = {"kernel": cp.wg[k, :c, :h], "bias": cp.bg[k, :h]}
      p["down"] = {"kernel": scale(cp.w2[k, :h, :c]), "bias": scale(cp.b2[k, :c])}
    else:
      p["shift"] = scale(cp.b2[k, :c])
    s = scale(cp.s[k, :c]) if diagonal else None
    if not residual and w != 1.0:
      # (1 - a) x + a f  ==  x + (a f - a x): a residual branch with a -a diagonal term.
      residual, diagonal = True, True
      s = (np.zeros((c,), np.float32) if s is None else s) - np.float32(w)
    if diagonal:
      p["scale"] = s.astype(np.float32)
    children.append(em.ChildSpec(seed=k, offset=off, width=c, wiring="chunk", hidden=h,
                                 activation=bp.activation, residual=residual, glu=bp.glu,
                                 diagonal=diagonal))
    child_params[f"child{k}"] = p

  use_bias = host.bias is not None
  if not children:
    layer = em.LayerSpec(name=name, in_features=din, features=dout, activation=host.activation,
                         use_bias=use_bias)
    return layer, ({"kernel": host.kernel, "bias": host.bias} if use_bias
                   else {"kernel": host.kernel})
  # The parallel children's first layers join the host kernel in the order `_pieces` reads
  # them (by chunk offset); a host without bias gets a zero one if they bring biases.
  extra_kernel.sort(key=lambda t: t[0])
  extra_bias.sort(key=lambda t: t[0])
  use_bias = use_bias or bool(extra_bias)
  dense = {"kernel": np.concatenate([host.kernel] + [a for _, a in extra_kernel], axis=1)}
  if use_bias:
    hb = host.bias if host.bias is not None else np.zeros((dout,), np.float32)
    dense["bias"] = np.concatenate([hb] + [a for _, a in extra_bias])
  layer = em.LayerSpec(name=name, in_features=din, features=dout, activation=host.activation,
                       use_bias=use_bias, children=tuple(sorted(children, key=lambda c: c.offset)))
  return layer, {"dense": dense, **child_params}


def _layer_names(hosts: list[_Host]) -> list[str]:
  names = ["_".join(map(str, h.path)) or f"layer{i}" for i, h in enumerate(hosts)]
  seen = set()
  out = []
  for i, n in enumerate(names):
    if n in seen or not n.isidentifier():
      n = f"layer{i}"
    seen.add(n)
    out.append(n)
  return out


# ----------------------------------------------------------------------------- the result


@functools.lru_cache(maxsize=32)
def _jitted_apply(spec: em.ModelSpec):
  module = em.GrownModel(spec)
  return jax.jit(lambda params, x: module.apply({"params": params}, x))


@dataclasses.dataclass(frozen=True)
class Exported:
  """A grown model as plain Flax: `spec` (structure) and `params` (numpy, the Linen tree of
  `export_model.GrownModel(spec)`)."""

  spec: em.ModelSpec
  params: Any

  @property
  def input_dim(self) -> int:
    return self.spec.input_dim

  @property
  def module(self) -> em.GrownModel:
    """The Linen module; `module.apply({"params": params}, x)`."""
    return em.GrownModel(self.spec)

  def nnx_model(self) -> em.GrownModelNNX:
    """The NNX module, holding these parameters."""
    return em.load_nnx(self.spec, self.params)

  def apply(self, x: jax.Array) -> jax.Array:
    """The exported model on `x` (jitted; one compilation per structure)."""
    return _jitted_apply(self.spec)(self.params, x)

  def param_count(self) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(self.params)))

  def jax_export(self, batch: str | int = "b") -> jax.export.Exported:
    """`jax.export` of the apply function, the parameters baked in as constants; `batch`:
    a symbolic batch dimension name (any batch size) or a fixed size."""
    if isinstance(batch, bool) or not isinstance(batch, (str, int)):
      raise TypeError(f"batch: expected a str or int, got {type(batch).__name__}")
    if isinstance(batch, str):
      shape = jax.export.symbolic_shape(f"{batch}, {self.input_dim}")
    else:
      if batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch}")
      shape = (batch, self.input_dim)
    module, params = self.module, jax.tree.map(jnp.asarray, self.params)
    fn = jax.jit(lambda x: module.apply({"params": params}, x))
    return jax.export.export(fn)(jax.ShapeDtypeStruct(shape, jnp.float32))

  def serialize(self, batch: str | int = "b") -> bytes:
    """StableHLO bytes; load with `jax.export.deserialize(bytearray(b)).call(x)`."""
    return bytes(self.jax_export(batch).serialize())

  def save(self, directory: str) -> dict[str, str]:
    """Writes `model.json` (the spec), `params.msgpack` (flax.serialization),
    `grown_model.py` (the model's source, Flax only) and `apply.stablehlo` (serialized)."""
    import flax.serialization  # pylint: disable=g-import-not-at-top
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in
             ("model.json", "params.msgpack", "grown_model.py", "apply.stablehlo")}
    with open(paths["model.json"], "w") as fh:
      fh.write(self.spec.to_json())
    with open(paths["params.msgpack"], "wb") as fh:
      fh.write(flax.serialization.msgpack_serialize(self.params))
    with open(paths["grown_model.py"], "w") as fh:
      fh.write(inspect.getsource(em))
    with open(paths["apply.stablehlo"], "wb") as fh:
      fh.write(self.serialize())
    return paths


def export(source, *, include: str = "fossilized", input_dim: int | None = None) -> Exported:
  """The plain Flax export of a Kasmina model (see the module docstring).

  `source`: a Linen `training.TrainState` or an NNX model; `include`: "fossilized" or
  "live"; `input_dim`: the model's input width (found from its first layer when None).
  """
  if include not in INCLUDE:
    raise ValueError(f"include: expected one of {INCLUDE}, got {include!r}")
  if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, int)
                                or input_dim < 1):
    raise ValueError(f"input_dim: expected a positive int or None, got {input_dim!r}")
  from kasmina_jax import export_lm, transformer  # pylint: disable=g-import-not-at-top
  if isinstance(source, training.TrainState) and isinstance(source.model,
                                                             transformer.GrowableLM):
    return export_lm.export_lm(source, include=include)
  if isinstance(source, training.TrainState):
    hosts = export_linen_hosts(source.model, source.params, source.kasmina, input_dim)
  elif isinstance(source, nnx.Module):
    unsupported = _first_unsupported_nnx(source)
    if unsupported is not None:
      raise _unsupported_error(unsupported)
    hosts = _trace_nnx(source, input_dim or _nnx_input_dim(source))
  else:
    raise TypeError(f"source: expected a kasmina_jax.training.TrainState or an nnx.Module, "
                    f"got {type(source).__name__}")
  layers, params = [], {}
  for host, name in zip(hosts, _layer_names(hosts)):
    layer, p = _fold_layer(host, name, include)
    layers.append(layer)
    params[name] = p
  return Exported(em.ModelSpec(tuple(layers)), params)


def _chain_input_dim(shapes: list[tuple[int, int]]) -> int:
  """The chain's input width: the one layer input width that no layer outputs."""
  ins, outs = {s[0] for s in shapes}, {s[1] for s in shapes}
  first = ins - outs
  if len(first) != 1:
    raise ValueError(f"input_dim: cannot tell the model's input width from its layers "
                     f"(candidates {sorted(first) or sorted(ins)}); pass input_dim=")
  return first.pop()


def export_linen_hosts(model, params, kasmina, input_dim: int | None) -> list[_Host]:
  if input_dim is None:
    shapes = [np.shape(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
              if getattr(path[-1], "key", None) == "kernel" and np.ndim(leaf) == 2]
    try:
      input_dim = _chain_input_dim(shapes)
    except ValueError as no_width:
      # No chain's width (e.g. a transformer's Dense layers): say first what cannot be folded,
      # if a probe trace (any width: it stops at the first unsupported module) finds it.
      try:
        _trace_linen(model, params, kasmina, 1)
      except ValueError as e:
        if _CANNOT_FOLD in str(e):
          raise e from None
      except Exception:  # pylint: disable=broad-except
        pass  # the probe's width did not fit the model: the width is the error to report
      raise no_width
  return _trace_linen(model, params, kasmina, input_dim)


# ------------------------------------------------------------------------------------- cost


def _measure(fn, args, repeats: int) -> tuple[float, float]:
  """(FLOPs by XLA's cost analysis, median seconds a call) of `fn(*args)`, compiled once.

  Parameters are arguments, not constants: XLA would otherwise fold the empty slots away and
  the Kasmina figures would not be what a training run executes."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return flops, float(np.median(times))


def kasmina_eval_fn(source):
  """The Kasmina model's evaluation pass as a function of `x` (what export must equal)."""
  fn, variables = _kasmina_eval(source)
  return lambda x: fn(variables, x)


def _kasmina_eval(source):
  """`(fn, variables)`: `fn(variables, x)` is the Kasmina model's evaluation pass."""
  if isinstance(source, training.TrainState):
    model = source.model
    return ((lambda v, x: model.apply(v, x, train=False)),
            {"params": source.params, knn.KASMINA: source.kasmina})
  if isinstance(source, nnx.Module):
    model = nnx.clone(source)
    model.eval()
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state
  raise TypeError(f"source: expected a kasmina_jax.training.TrainState or an nnx.Module, "
                  f"got {type(source).__name__}")


def _kasmina_params(source) -> tuple[int, int]:
  """(all parameters held, host + active children's parameters)."""
  if isinstance(source, training.TrainState):
    counts = training.param_counts(source)
    return counts["host"] + counts["allocated"], counts["model"]
  params = nnx.state(source, nnx.Param)
  total = int(sum(np.size(a) for a in jax.tree.leaves(params)))
  allocated = active = 0
  for layer in knx.find_layers(source).values():
    allocated += int(sum(np.size(a) for a in jax.tree.leaves(layer.children.get())))
    seeds = layer.seeds.get_value()
    live = np.asarray(lifecycle.stage_in(seeds.stage, lifecycle.ACTIVE_STAGES))
    b = np.clip(np.asarray(seeds.blueprint), 0, layer.spec.num_blueprints - 1)
    active += int(np.sum(np.where(live, layer.spec.catalog.param_count[b], 0)))
  return total, total - allocated + active


def cost_report(source, exported: Exported, x: jax.Array, *, repeats: int = 50) -> dict:
  """Parameters, FLOPs per row (XLA's cost analysis of the compiled function) and CPU time
  per batch `x` (median of `repeats` calls) of the Kasmina model's evaluation pass and of the
  exported model, both jitted with their parameters as arguments. `params` of the Kasmina
  model counts every slot's max-capacity layout it holds; `params_active` host + the
  children of seeds in TRAINING .. FOSSILIZED."""
  if not isinstance(exported, Exported):
    raise TypeError(f"exported: expected an Exported, got {type(exported).__name__}")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[-1] != exported.input_dim:
    raise ValueError(f"x: expected shape (rows, {exported.input_dim}), got {tuple(x.shape)}")
  rows = x.shape[0]
  kfn, kvars = _kasmina_eval(source)
  module = exported.module
  efn = lambda p, x: module.apply({"params": p}, x)
  total, active = _kasmina_params(source)
  kflops, ksec = _measure(kfn, (kvars, x), repeats)
  eflops, esec = _measure(efn, (jax.tree.map(jnp.asarray, exported.params), x), repeats)
  n = exported.param_count()
  return {
      "rows": rows,
      "kasmina": {"params": total, "params_active": active, "flops_per_row": kflops / rows,
                  "ms_per_batch": 1e3 * ksec},
      "exported": {"params": n, "params_active": n, "flops_per_row": eflops / rows,
                   "ms_per_batch": 1e3 * esec},
  }


def format_cost(report: dict) -> str:
  """A markdown table of `cost_report`'s figures."""
  lines = ["| model | params (held) | params (active) | FLOPs / row | CPU ms / batch of "
           f"{report['rows']} |", "| --- | --- | --- | --- | --- |"]
  for name in ("kasmina", "exported"):
    r = report[name]
    lines.append(f"| {name} | {r['params']} | {r['params_active']} | {r['flops_per_row']:.0f} "
                 f"| {r['ms_per_batch']:.3f} |")
  return "\n".join(lines)

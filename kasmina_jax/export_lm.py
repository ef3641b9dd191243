"""Export of a grown `transformer.GrowableLM`: a plain Flax transformer
(`export_model.GrownLM`) with the fossilized children folded in.

- a head child becomes extra causal heads beside its block's attention (`ExtraHeads`: the
  child's live heads and head widths, its output projection);
- an MLP-width child (parallel-wired, in a block's MLP) becomes extra hidden units of that
  MLP: its first layer joins `mlp_in` as more columns, and its output layer, composed with
  the rows of `mlp_out` its chunk feeds, joins `mlp_out` as more rows (exact: the child adds
  to the MLP's activations, which `mlp_out` maps linearly);
- a block child becomes a `ParallelBlock` after its host block;
- seeds in DORMANT, GERMINATED, CULLED, CANCELLED or ROLLED_BACK are dropped.

`include` is `export.export`'s: in-flight seeds are an error by default, or folded as the
evaluation pass computes them (`include="live"`: a GRAFTING child with its output layer
scaled by alpha, a TRAINING child dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

import jax
import numpy as np

from kasmina_jax import _fold
from kasmina_jax import export_model as em
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import transformer

__all__ = ["ExportedLM", "export_lm"]


@functools.lru_cache(maxsize=16)
def _jitted_apply(spec: em.LMSpec):
  module = em.GrownLM(spec)
  return jax.jit(lambda params, tokens: module.apply({"params": params}, tokens))


@dataclasses.dataclass(frozen=True)
class ExportedLM:
  """A grown LM as plain Flax: `spec` and `params` (the Linen tree of
  `export_model.GrownLM(spec)`)."""

  spec: em.LMSpec
  params: Any

  @property
  def module(self) -> em.GrownLM:
    return em.GrownLM(self.spec)

  def apply(self, tokens: jax.Array) -> jax.Array:
    return _jitted_apply(self.spec)(self.params, tokens)

  def param_count(self) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(self.params)))

  def save(self, directory: str) -> dict[str, str]:
    """Writes `model.json`, `params.msgpack` and `grown_model.py` (Flax only)."""
    import flax.serialization  # pylint: disable=g-import-not-at-top
    os.makedirs(directory, exist_ok=True)
    paths = {n: os.path.join(directory, n)
             for n in ("model.json", "params.msgpack", "grown_model.py")}
    with open(paths["model.json"], "w") as fh:
      fh.write(self.spec.to_json())
    with open(paths["params.msgpack"], "wb") as fh:
      fh.write(flax.serialization.msgpack_serialize(self.params))
    with open(paths["grown_model.py"], "w") as fh:
      fh.write(inspect.getsource(em))
    return paths


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _weights(seeds: lifecycle.SeedState, include: str, where: str) -> np.ndarray:
  """(K,) the weight each seed's child enters the evaluation pass with (0: dropped)."""
  return _fold.fold_weights(seeds, include, where)


def _layer(kasmina, path: tuple):
  return knn.get_path(kasmina, path + ("state",))


def export_lm(state, *, include: str = "fossilized") -> ExportedLM:
  """The plain export of a Linen `training.TrainState` whose model is a `GrowableLM`."""
  model = state.model
  if not isinstance(model, transformer.GrowableLM):
    raise TypeError(f"state.model: expected a transformer.GrowableLM, got "
                    f"{type(model).__name__}")
  params, kasmina = _np(state.params), state.kasmina
  out: dict[str, Any] = {"embed": params["embed"], "pos": params["pos"],
                         "ln_f": params["ln_f"], "head": params["head"]}
  blocks = []
  for i in range(model.layers):
    name = f"block{i}"
    p = params[name]
    bp: dict[str, Any] = {"ln1": p["ln1"], "ln2": p["ln2"]}
    extra_heads: list[em.HeadGroupSpec] = []
    if model.head_seeds:
      bp["attn"] = p["attn"]["host"]
      extra_heads = _fold_heads(_layer(kasmina, (name, "attn", "kasmina")),
                                p["attn"]["kasmina"]["children"], include,
                                f"{name}/attn", bp)
    else:
      bp["attn"] = p["attn"]
    if model.mlp_seeds:
      mlp_in, mlp_out = _fold_mlp(_layer(kasmina, (name, "mlp_in", "kasmina")),
                                  p["mlp_in"], p["mlp_out"], include, f"{name}/mlp_in")
    else:
      mlp_in, mlp_out = p["mlp_in"], p["mlp_out"]
    bp["mlp_in"], bp["mlp_out"] = mlp_in, mlp_out
    grown: list[em.ParallelBlockSpec] = []
    if model.block_seeds:
      gname = f"grow{i}"
      for spec_j, p_j in _fold_blocks(_layer(kasmina, (gname, "kasmina")),
                                      params[gname]["kasmina"]["children"], include, gname):
        out[f"grown{i}_{len(grown)}"] = p_j
        grown.append(spec_j)
    out[name] = bp
    blocks.append(em.LMBlockSpec(extra_heads=tuple(extra_heads),
                                 mlp_width=int(mlp_in["kernel"].shape[1]), grown=tuple(grown)))
  spec = em.LMSpec(vocab=model.vocab, dim=model.dim, context=model.context, heads=model.heads,
                   blocks=tuple(blocks))
  return ExportedLM(spec, out)


def _fields(children) -> dict:
  """A children record (or its NNX field mapping) as `{field: array}`."""
  if isinstance(children, dict):
    return children
  return {f.name: getattr(children, f.name) for f in dataclasses.fields(children)}


def _live_children(lv, children, include: str, where: str):
  """`(seed, weight, blueprint id)` of every seed whose child the export folds in (weight
  > 0), each child's parameters checked finite."""
  weights = _weights(lv.seeds, include, where)
  blueprint = np.clip(np.asarray(lv.seeds.blueprint), 0, lv.spec.num_blueprints - 1)
  for k in range(lv.spec.num_seeds):
    if weights[k] != 0.0:
      _check_finite(children, k, where)
      yield k, weights[k], int(blueprint[k])


def _head_params(children, k: int, heads: int, head_dim: int, weight) -> dict:
  """`export_model.ExtraHeads` parameters of seed `k`'s live heads and widths, the output
  projection scaled by the seed's weight."""
  live = (slice(None), slice(heads), slice(head_dim))
  return {"query": children["wq"][k][live], "key": children["wk"][k][live],
          "value": children["wv"][k][live],
          "out": weight * children["wo"][k][:heads, :head_dim, :]}


def _fold_heads(lv, children, include: str, where: str, block_params: dict):
  children = _fields(children)
  groups = []
  for k, weight, b in _live_children(lv, children, include, where):
    bp = lv.spec.catalog.blueprints[b]
    block_params[f"heads{len(groups)}"] = _head_params(children, k, bp.heads, bp.head_dim,
                                                       weight)
    groups.append(em.HeadGroupSpec(heads=bp.heads, head_dim=bp.head_dim))
  return groups


def _fold_mlp(lv, host_in, host_out, include: str, where: str):
  """The block's MLP with the live parallel children as extra hidden units."""
  spec = lv.spec
  cat = spec.catalog
  if any(b.wiring != "parallel" for b in cat.blueprints):
    raise ValueError(f"{where}: exporting a GrowableLM folds MLP-width (parallel-wired) "
                     f"children only; this layer's catalog is {cat.names}")
  if any(b.activation != "gelu" for b in cat.blueprints):
    raise ValueError(f"{where}: MLP-width children fold into the MLP only with its activation "
                     f"(gelu); the catalog's are {[b.activation for b in cat.blueprints]}")
  kernels_in, biases_in = [host_in["host"]["kernel"]], [host_in["host"]["bias"]]
  kernels_out, bias_out = [host_out["kernel"]], np.array(host_out["bias"])
  children = _fields(host_in["kasmina"]["children"])
  for k, weight, b in _live_children(lv, children, include, where):
    width = int(cat.hidden_mask[b].sum())
    off, c = spec.chunk_offsets[k], spec.chunk_sizes[k]
    rows = host_out["kernel"][off:off + c]  # (c, D): the mlp_out rows this chunk feeds
    kernels_in.append(children["w1u"][k][:, :width])
    biases_in.append(children["b1"][k][:width])
    kernels_out.append(weight * children["w2"][k][:width, :c] @ rows)
    bias_out = bias_out + weight * children["b2"][k][:c] @ rows
  mlp_in = {"kernel": np.concatenate(kernels_in, axis=1), "bias": np.concatenate(biases_in)}
  mlp_out = {"kernel": np.concatenate(kernels_out, axis=0), "bias": bias_out}
  return mlp_in, mlp_out


def _fold_blocks(lv, children, include: str, where: str):
  children = _fields(children)
  for k, weight, b in _live_children(lv, children, include, where):
    bp = lv.spec.catalog.blueprints[b]
    h, e, m = bp.heads, bp.head_dim, bp.mlp_hidden
    p: dict[str, Any] = {}
    if h:
      p["ln1"] = {"scale": children["ln1_scale"][k], "bias": children["ln1_bias"][k]}
      p["attn"] = _head_params(children, k, h, e, weight)
    if m:
      p["ln2"] = {"scale": children["ln2_scale"][k], "bias": children["ln2_bias"][k]}
      p["mlp_in"] = {"kernel": children["w_in"][k][:, :m], "bias": children["b_in"][k][:m]}
      p["mlp_out"] = {"kernel": weight * children["w_out"][k][:m],
                      "bias": weight * children["b_out"][k]}
    yield em.ParallelBlockSpec(heads=h, head_dim=e, mlp_hidden=m, activation=bp.activation), p


def _check_finite(children, k: int, where: str) -> None:
  for name, leaf in _fields(children).items():
    if not np.all(np.isfinite(np.asarray(leaf[k]))):
      raise ValueError(f"{where}: seed {k}'s child has non-finite parameters ({name}); the "
                       "export cannot mimic the identity fallback of a non-finite child")


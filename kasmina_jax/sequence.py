"""Sequence-aware children: extra causal attention heads and whole residual blocks.

The chunk children of `blueprints` map each token on its own; in a transformer that adds
per-token capacity only, which is not what growing a transformer needs (extra heads and extra
depth are). The children here keep the token axis (`x` is `(..., T, D)`, the token axis
second to last), so a child can mix tokens, always causally: position `t` of a child's output
reads positions `<= t` of its input only.

Two sites, one per layer (every blueprint of a layer's catalog has the same `site`):

- `site="heads"`: a seed's child is `heads` extra causal attention heads. It is parallel
  wired: it reads `u`, the (normalised) input of the host attention, and adds to the host
  attention's output `x`: `g = x + f(u)`, `f(u) = sum_h softmax(q_h k_h^T / sqrt(d) + causal)
  v_h W_o,h`, with `W_o = 0` at germination (head growth).
- `site="block"`: a seed's child is a whole pre-norm residual block on the residual stream
  `x` between two host blocks, `g = x + f(x)`,
  `f(x) = Attn(LN_1(x)) + MLP(LN_2(x))` (the parallel form of GPT-J / PaLM: attention and MLP
  read the same stream; `heads=0` gives an MLP-only block), attention output projection and
  MLP output layer zero at germination (depth growth). A layer of K block seeds is where a
  model may grow up to K blocks; they sit side by side on the same stream (each reads the
  stream as it enters the layer), so several grown blocks at one site add like one wider
  block, and depth comes from sites between different host blocks.

Both are residual children (`f = 0` at germination), so they follow the stage table of every
residual / parallel child (`layer`): the child's value enters nothing before GRAFTING; in
TRAINING it learns `<dL/dout, f> + lambda mean ||f||^2` through the straight-through estimator
with its input under `stop_gradient`; GRAFTING blends `x + alpha f(sg input)`; from
STABILIZATION on the host's gradient flows through the child. The parallel block form keeps
`f` linear in its last layers (`W_o`, `W_out`, `b_out`) jointly, so `whole_objective`'s
Euler identity (`sum theta dL/dtheta = <dL/df, f>`) holds for these children as for the chunk
children.

Health. A head's or a block's seed watches chunk `k` of the activation it writes into (the
host attention output for heads, the residual stream for blocks; `numpy.array_split` chunks
as every layer): chunk variance, dead-node ratio and inter-node correlation of those channels
over the epoch's tokens, as for any Kasmina layer, and once the seed is active its child's
objective, gradient variance and cost. Its need score thus says how degenerate that part of
the host's output is; what the child adds is judged by the counterfactual `Delta`, as for
every child.

Cost. Parameters as allocated by the blueprint; FLOPs per token `2 x` the child's matmul
parameters (the `6N` convention's forward part) plus attention's context term at the
catalog's `context` (`4 T h d` for `h` heads of width `d` over `T` tokens; 0 when the context
is not given).

These children run under XLA (no fused kernel); every `impl` runs this reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import _checks
from kasmina_jax import _struct as struct
from kasmina_jax import chunks

SITES = ("heads", "block")
ACTIVATIONS = ("identity", "relu", "gelu", "tanh")
LN_EPS = 1e-6
# A causal mask's excluded scores (finite: a fully masked row cannot occur, position t sees t).
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class SequenceBlueprint:
  """A child that keeps the token axis (see the module docstring).

  `site`: "heads" (extra causal attention heads beside a host attention) or "block" (a
  parallel pre-norm residual block on the residual stream). `heads`, `head_dim`: its
  attention heads and their width (`heads=0` is an MLP-only block); `mlp_hidden`: the
  block's MLP width (0 for head children); `activation`: the MLP's.
  """

  name: str
  site: str = "heads"
  heads: int = 1
  head_dim: int = 16
  mlp_hidden: int = 0
  activation: str = "gelu"

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"SequenceBlueprint.name: expected a non-empty str, got {self.name!r}")
    if self.site not in SITES:
      raise ValueError(f"SequenceBlueprint.site: expected one of {SITES}, got {self.site!r}")
    _checks.non_negative_int("SequenceBlueprint.heads", self.heads)
    _checks.positive_int("SequenceBlueprint.head_dim", self.head_dim)
    _checks.non_negative_int("SequenceBlueprint.mlp_hidden", self.mlp_hidden)
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"SequenceBlueprint.activation: expected one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    if self.site == "heads" and (self.heads < 1 or self.mlp_hidden):
      raise ValueError(f"SequenceBlueprint {self.name!r}: a heads child has heads >= 1 and "
                       f"no MLP (mlp_hidden=0), got heads={self.heads}, "
                       f"mlp_hidden={self.mlp_hidden}")
    if self.site == "block" and not (self.heads or self.mlp_hidden):
      raise ValueError(f"SequenceBlueprint {self.name!r}: a block needs heads >= 1 or "
                       "mlp_hidden >= 1")

  # What the generic code (Tamiyo, readiness, optimizer) asks of every blueprint.
  @property
  def kind(self) -> str:
    return "residual"

  @property
  def wiring(self) -> str:
    return "parallel" if self.site == "heads" else "chunk"

  def cost(self, dim: int, input_width: int | None = None,
           context: int = 0) -> tuple[int, int]:
    """(parameter count, FLOPs per token) of this child on a stream of width `dim`."""
    din = (input_width or dim) if self.site == "heads" else dim
    hd = self.heads * self.head_dim
    matmul = 3 * din * hd + hd * dim + dim * self.mlp_hidden + self.mlp_hidden * dim
    params = matmul + self.mlp_hidden + (dim if self.mlp_hidden else 0)
    if self.site == "block":
      params += 2 * dim * ((self.heads > 0) + (self.mlp_hidden > 0))  # the norms' scale, bias
    flops = 2 * matmul + 4 * int(context) * hd
    return params, flops


def head_blueprints(*, head_dim: int = 16, heads: Sequence[int] = (1, 2)
                    ) -> tuple[SequenceBlueprint, ...]:
  """A head-growth catalog: one blueprint per head count in `heads` (ACCURACY selection
  takes the largest)."""
  return tuple(SequenceBlueprint(f"attention_heads_{h}", site="heads", heads=h,
                                 head_dim=head_dim) for h in heads)


def block_blueprints(*, heads: int = 2, head_dim: int = 16, mlp_hidden: int = 64,
                     activation: str = "gelu") -> tuple[SequenceBlueprint, ...]:
  """A depth-growth catalog: a whole block (attention + MLP) and an MLP-only block."""
  return (SequenceBlueprint("transformer_block", site="block", heads=heads,
                            head_dim=head_dim, mlp_hidden=mlp_hidden, activation=activation),
          SequenceBlueprint("mlp_block", site="block", heads=0, head_dim=head_dim,
                            mlp_hidden=mlp_hidden, activation=activation))


def is_sequence_catalog(blueprints) -> bool:
  """Whether `blueprints` is a sequence catalog (raises on a mix of the two families)."""
  blueprints = tuple(blueprints)
  seq = [isinstance(b, SequenceBlueprint) for b in blueprints]
  if any(seq) and not all(seq):
    raise TypeError("blueprints: a layer holds either chunk blueprints (blueprints.Blueprint) "
                    "or sequence blueprints (sequence.SequenceBlueprint), not both")
  return bool(seq) and all(seq)


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceCatalog:
  """Static per-blueprint tables of one sequence layer (numpy: jit constants)."""

  blueprints: tuple[SequenceBlueprint, ...]
  dim: int
  input_width: int  # the children's input width (u's for heads, dim for blocks)
  site: str
  heads: int  # max over the catalog (at least 1, so shapes are never empty)
  head_dim: int
  mlp: int  # max MLP width (0 for a heads site)
  head_mask: np.ndarray  # (B, heads) float32
  dim_mask: np.ndarray  # (B, head_dim) float32
  mlp_mask: np.ndarray  # (B, mlp) float32
  act_id: np.ndarray  # (B,) int32
  residual: np.ndarray  # (B,) bool, all True
  parallel: np.ndarray  # (B,) bool: reads u (heads site)
  param_count: np.ndarray  # (B,) int32
  flops_per_row: np.ndarray  # (B,) int32, per token

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(b.name for b in self.blueprints)

  @property
  def any_parallel(self) -> bool:
    return self.site == "heads"

  any_glu = False
  any_diagonal = False

  @property
  def norms(self) -> bool:
    return self.site == "block"

  def __hash__(self):
    return hash((self.blueprints, self.dim, self.input_width))

  def __eq__(self, other):
    return (isinstance(other, SequenceCatalog) and self.blueprints == other.blueprints
            and self.dim == other.dim and self.input_width == other.input_width)


def build_catalog(blueprints: Sequence[SequenceBlueprint], dim: int,
                  input_width: int | None = None, context: int = 0) -> SequenceCatalog:
  blueprints = tuple(blueprints)
  if not blueprints:
    raise ValueError("blueprints: expected at least one SequenceBlueprint, got an empty tuple")
  for i, bp in enumerate(blueprints):
    if not isinstance(bp, SequenceBlueprint):
      raise TypeError(f"blueprints[{i}]: expected a SequenceBlueprint, got {type(bp).__name__}")
  names = [b.name for b in blueprints]
  if len(set(names)) != len(names):
    raise ValueError(f"blueprints: names must be unique, got {names}")
  sites = {b.site for b in blueprints}
  if len(sites) != 1:
    raise ValueError(f"blueprints: one layer is one site; got the sites {sorted(sites)} "
                     "(make one layer of head seeds and another of block seeds)")
  site = sites.pop()
  if site == "heads" and not input_width:
    raise ValueError("input_dim: head children read the host attention's input u; pass its "
                     "width (input_dim), got None")
  din = int(input_width) if site == "heads" else dim
  heads = max(1, max(b.heads for b in blueprints))
  head_dim = max(b.head_dim for b in blueprints)
  mlp = max(b.mlp_hidden for b in blueprints)
  n = len(blueprints)
  head_mask = np.zeros((n, heads), np.float32)
  dim_mask = np.zeros((n, head_dim), np.float32)
  mlp_mask = np.zeros((n, mlp), np.float32)
  for i, b in enumerate(blueprints):
    head_mask[i, :b.heads] = 1.0
    dim_mask[i, :b.head_dim] = 1.0
    mlp_mask[i, :b.mlp_hidden] = 1.0
  costs = [b.cost(dim, din, context) for b in blueprints]
  return SequenceCatalog(
      blueprints=blueprints, dim=dim, input_width=din, site=site, heads=heads,
      head_dim=head_dim, mlp=mlp, head_mask=head_mask, dim_mask=dim_mask, mlp_mask=mlp_mask,
      act_id=np.array([ACTIVATIONS.index(b.activation) for b in blueprints], np.int32),
      residual=np.ones((n,), bool), parallel=np.full((n,), site == "heads"),
      param_count=np.array([c[0] for c in costs], np.int32),
      flops_per_row=np.array([c[1] for c in costs], np.int32))


@struct.dataclass
class SequenceChildParams:
  """One sequence layer's children, max-capacity layout (leaves shaped `(K, ...)`).

  `ln*` have a zero-sized last axis at a heads site (head children read the host's already
  normalised input), the MLP leaves a zero-sized width where the catalog has no MLP."""

  ln1_scale: jax.Array  # (K, D) block, (K, 0) heads
  ln1_bias: jax.Array
  wq: jax.Array  # (K, Din, H, d)
  wk: jax.Array
  wv: jax.Array
  wo: jax.Array  # (K, H, d, D)
  ln2_scale: jax.Array  # (K, D) block with an MLP, else (K, 0)
  ln2_bias: jax.Array
  w_in: jax.Array  # (K, D, M)
  b_in: jax.Array  # (K, M)
  w_out: jax.Array  # (K, M, D)
  b_out: jax.Array  # (K, D)

  # The leaves `f` is linear in, jointly: the Euler moment of `whole_objective`.
  LAST_LAYER = ("wo", "w_out", "b_out")


FIELDS = tuple(f.name for f in dataclasses.fields(SequenceChildParams))


def zeros_like_layout(catalog: SequenceCatalog, num_seeds: int,
                      dtype=jnp.float32) -> SequenceChildParams:
  k, d, din = num_seeds, catalog.dim, catalog.input_width
  h, e, m = catalog.heads, catalog.head_dim, catalog.mlp
  ln = d if catalog.norms else 0
  ln2 = d if (catalog.norms and m) else 0
  z = lambda *s: jnp.zeros((k,) + s, dtype)
  return SequenceChildParams(
      ln1_scale=z(ln), ln1_bias=z(ln), wq=z(din, h, e), wk=z(din, h, e), wv=z(din, h, e),
      wo=z(h, e, d), ln2_scale=z(ln2), ln2_bias=z(ln2), w_in=z(d, m), b_in=z(m),
      w_out=z(m, d), b_out=z(d))


def _fresh_child(catalog: SequenceCatalog, blueprint: jax.Array, key: jax.Array,
                 dtype) -> SequenceChildParams:
  """One seed's germinated child: random q/k/v and MLP input layer over the blueprint's live
  heads, widths and units; zero output projection and output layer (so `f = 0`)."""
  b = jnp.clip(blueprint, 0, len(catalog.blueprints) - 1)
  hm = jnp.asarray(catalog.head_mask)[b]
  dm = jnp.asarray(catalog.dim_mask)[b]
  mm = jnp.asarray(catalog.mlp_mask)[b]
  d, din = catalog.dim, catalog.input_width
  h, e, m = catalog.heads, catalog.head_dim, catalog.mlp
  kq, kk, kv, km = jax.random.split(key, 4)
  qkv_mask = hm[:, None] * dm[None, :]
  draw = lambda kk_: (jax.random.normal(kk_, (din, h, e)) / math.sqrt(din)) * qkv_mask[None]
  w_in = jax.random.normal(km, (d, m)) / math.sqrt(d) * mm[None, :]
  ln = d if catalog.norms else 0
  ln2 = d if (catalog.norms and m) else 0
  cast = lambda a: a.astype(dtype)
  return SequenceChildParams(
      ln1_scale=jnp.ones((ln,), dtype), ln1_bias=jnp.zeros((ln,), dtype),
      wq=cast(draw(kq)), wk=cast(draw(kk)), wv=cast(draw(kv)), wo=jnp.zeros((h, e, d), dtype),
      ln2_scale=jnp.ones((ln2,), dtype), ln2_bias=jnp.zeros((ln2,), dtype),
      w_in=cast(w_in), b_in=jnp.zeros((m,), dtype), w_out=jnp.zeros((m, d), dtype),
      b_out=jnp.zeros((d,), dtype))


def germinate_children(catalog: SequenceCatalog, params: SequenceChildParams, mask: jax.Array,
                       blueprint: jax.Array, key: jax.Array) -> SequenceChildParams:
  """Fresh children for the seeds in `mask` (blueprint ids per seed), others unchanged."""
  k = mask.shape[0]
  keys = jax.random.split(key, k)
  fresh = jax.vmap(lambda b, kk: _fresh_child(catalog, b, kk, params.wq.dtype))(blueprint, keys)
  return jax.tree.map(
      lambda new, old: jnp.where(mask.reshape((k,) + (1,) * (old.ndim - 1)), new, old),
      fresh, params)


# ----------------------------------------------------------------------------- the child


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


def _activate(pre: jax.Array, act: jax.Array) -> jax.Array:
  """`act` one-hot over ACTIVATIONS (a seed's blueprint's)."""
  outs = (pre, jax.nn.relu(pre), jax.nn.gelu(pre, approximate=True), jnp.tanh(pre))
  return sum(a * o for a, o in zip(act, outs))


def _tables(catalog: SequenceCatalog, blueprint: jax.Array):
  """Per-seed float tables `(head_mask, dim_mask, mlp_mask, act one-hot, 1/sqrt(d))`."""
  b = jnp.clip(blueprint, 0, len(catalog.blueprints) - 1)
  dims = jnp.asarray([bp.head_dim for bp in catalog.blueprints], jnp.float32)[b]
  return (jnp.asarray(catalog.head_mask)[b], jnp.asarray(catalog.dim_mask)[b],
          jnp.asarray(catalog.mlp_mask)[b],
          jax.nn.one_hot(jnp.asarray(catalog.act_id)[b], len(ACTIVATIONS)),
          jax.lax.rsqrt(dims))


def child_output(catalog: SequenceCatalog, params: SequenceChildParams, tables, inp: jax.Array,
                 precision=None) -> jax.Array:
  """One seed's `f`: `params` and `tables` without the seed axis, `inp` `(..., T, Din)`
  float32 (u for heads, the stream for blocks) -> `(..., T, D)`. Causal over T."""
  head_mask, dim_mask, mlp_mask, act, inv_sqrt_d = tables
  dot = functools.partial(jnp.einsum, precision=precision)
  t = inp.shape[-2]
  f = jnp.zeros(inp.shape[:-1] + (catalog.dim,), jnp.float32)
  if catalog.norms:
    a = _layer_norm(inp, params.ln1_scale, params.ln1_bias)
  else:
    a = inp
  if any(b.heads for b in catalog.blueprints):  # every head child has heads >= 1
    qkv_mask = head_mask[:, None] * dim_mask[None, :]
    q = dot("...td,dhe->...the", a, params.wq * qkv_mask)
    k = dot("...td,dhe->...the", a, params.wk * qkv_mask)
    v = dot("...td,dhe->...the", a, params.wv * qkv_mask)
    scores = dot("...the,...she->...hts", q, k) * inv_sqrt_d
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1)
    o = dot("...hts,...she->...the", weights, v) * head_mask[:, None]
    f = f + dot("...the,hed->...td", o, params.wo)
  if catalog.mlp:
    m_in = _layer_norm(inp, params.ln2_scale, params.ln2_bias)
    hidden = _activate(dot("...td,dm->...tm", m_in, params.w_in) + params.b_in, act) * mlp_mask
    f = f + dot("...tm,md->...td", hidden, params.w_out) + params.b_out * jnp.any(mlp_mask > 0)
  return f


def _seed_outputs(catalog, params, tables, inp, precision):
  """`(K, ..., T, D)` f of every seed, and `(K,)` whether each is finite."""
  f = jax.vmap(lambda p, tb: child_output(catalog, p, tb, inp, precision))(params, tables)
  ok = jnp.all(jnp.isfinite(f).reshape(f.shape[0], -1), axis=-1)
  return f, ok


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _guarded_outputs(catalog, params, tables, inp, host_grad, precision):
  """`_seed_outputs` whose backward keeps a non-finite seed out of every gradient: its
  parameter cotangent is zero and its share of the input cotangent is left out (the seed
  contributes identity that step), and the input cotangent reaches the host only through the
  seeds in `host_grad` (a child's input is under `stop_gradient` before STABILIZATION)."""
  return _seed_outputs(catalog, params, tables, inp, precision)


def _go_fwd(catalog, params, tables, inp, host_grad, precision):
  out = _seed_outputs(catalog, params, tables, inp, precision)
  return out, (params, tables, inp, host_grad, out[1])


def _go_bwd(catalog, precision, res, cts):
  params, tables, inp, host_grad, ok = res
  ct_f = cts[0]

  def one(p, tb, ct):
    _, vjp = jax.vjp(lambda p_, i_: child_output(catalog, p_, tb, i_, precision), p, inp)
    return vjp(ct)

  d_params, d_inp = jax.vmap(one)(params, tables, ct_f)
  d_params = jax.tree.map(
      lambda g: jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), d_params)
  into_host = (ok & host_grad).reshape((-1,) + (1,) * (d_inp.ndim - 1))
  d_inp = jnp.sum(jnp.where(into_host, d_inp, 0.0), axis=0)
  # Every table is float (`_tables`); `host_grad` is a bool mask (a float0 cotangent).
  return (d_params, jax.tree.map(jnp.zeros_like, tables), d_inp,
          np.zeros(np.shape(host_grad), jax.dtypes.float0))


_guarded_outputs.defvjp(_go_fwd, _go_bwd)


def child_path(spec, params: SequenceChildParams, seeds, x: jax.Array, u, eval_alpha,
               precision):
  """The children's part of a sequence layer: `(out, child_loss, objective, recon_ratio,
  ok)`, `out` with `x`'s shape (`(..., T, D)`)."""
  catalog = spec.catalog
  stage, alpha = seeds.stage, seeds.alpha
  evaluating = eval_alpha is not None
  training, grafting, full_on, live, learning = chunks.stage_masks(stage)
  host_grad = full_on & (not evaluating)
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  p_eff = jax.tree.map(
      lambda p: jnp.where(learning.reshape((-1,) + (1,) * (p.ndim - 1)), p,
                          jax.lax.stop_gradient(p)), params32)
  inp = (u if catalog.site == "heads" else x).astype(jnp.float32)
  tables = _tables(catalog, seeds.blueprint)
  f, ok = _guarded_outputs(catalog, p_eff, tables, inp, host_grad, precision)
  ok = ok | ~live
  bshape = (-1,) + (1,) * (f.ndim - 1)
  use = (live & ok).reshape(bshape)
  f = jnp.where(use, f, 0.0)
  x32 = x.astype(jnp.float32)
  if evaluating:
    ea = jnp.broadcast_to(jnp.asarray(eval_alpha, jnp.float32), (spec.num_seeds,))
    delta = jnp.sum(ea.reshape(bshape) * f, axis=0)
  else:
    a = jax.lax.stop_gradient(alpha.astype(jnp.float32))
    weight = jnp.where(full_on, 1.0, jnp.where(grafting, a, 0.0)).reshape(bshape)
    ste = jnp.where(training.reshape(bshape), f - jax.lax.stop_gradient(f), 0.0)
    delta = jnp.sum(weight * f + ste, axis=0)
  out = x32 + delta
  rows = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
  f_obj = f if not evaluating else jax.lax.stop_gradient(f)
  sq_f = jnp.sum(jnp.square(f_obj).reshape(f.shape[0], -1), axis=-1)
  sq_x = jnp.sum(jnp.square(jax.lax.stop_gradient(x32)))
  objective = spec.trust_penalty * sq_f / rows
  child_loss = jnp.sum(jnp.where(training & ok, objective, 0.0))
  nan = jnp.full_like(objective, jnp.nan)
  aux_objective = jnp.where(live, jax.lax.stop_gradient(objective), nan)
  aux_ratio = jnp.where(live, jax.lax.stop_gradient(sq_f) / jnp.maximum(sq_x, 1e-30), nan)
  return out.astype(x.dtype), child_loss, aux_objective, aux_ratio, ok


def whole_objective(params: SequenceChildParams, grads: SequenceChildParams) -> jax.Array:
  """(K,) `sum(theta * dL/dtheta)` over the leaves `f` is jointly linear in (`LAST_LAYER`):
  `<dL/df, f>` exactly (see `layer.whole_objective`)."""
  e = jnp.zeros(params.b_out.shape[:1], jnp.float32)
  for name in SequenceChildParams.LAST_LAYER:
    p = getattr(params, name).astype(jnp.float32)
    g = getattr(grads, name).astype(jnp.float32)
    e = e + jnp.sum((p * g).reshape(p.shape[0], -1), axis=-1)
  return e


def check_sequence_input(spec, x, u) -> None:
  """Sequence layers need a token axis: `x` is `(..., T, D)`."""
  if x.ndim < 2:
    raise ValueError(f"x: a sequence layer ({spec.catalog.site} seeds) expects (..., T, "
                     f"{spec.dim}) with a token axis, got shape {tuple(x.shape)}")
  if spec.catalog.site == "heads":
    if u is None:
      raise ValueError("u: head children read the host attention's input; pass it as u")
    if u.shape[:-1] != x.shape[:-1] or u.shape[-1] != spec.input_dim:
      raise ValueError(f"u: expected shape {tuple(x.shape[:-1]) + (spec.input_dim,)}, got "
                       f"{tuple(u.shape)}")


__all__ = [
    "SITES", "SequenceBlueprint", "SequenceCatalog", "SequenceChildParams", "block_blueprints",
    "build_catalog", "child_output", "head_blueprints", "is_sequence_catalog",
]

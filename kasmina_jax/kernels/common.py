"""The fused primitive every kernel backend implements, and the wrapper shared by all of them.

`kasmina_jax.layer.forward_reference` is the contract of the whole layer. This module cuts it
into two parts:

* a shared wrapper (`forward`), plain XLA, that validates nothing (the layer did), reshapes
  `x` to `(N, D)`, turns the seeds' stages into per-seed float masks (`SeedInputs`), runs the
  parallel-wiring first-layer GEMM (`u @ W1u`, one batched GEMM that XLA does well), calls the
  backend's fused primitive once, and builds `StepAux` and the merged telemetry from what the
  primitive returns;
* the fused primitive (`fused_blend_reference` is its executable definition): ONE pass over
  `x` that runs every live child, blends by stage, writes the output, and accumulates the
  per-seed sums the aux and the telemetry need. Its backward (`fused_blend_backward_reference`)
  maps the output cotangent to the input, child-parameter and `pre_u` cotangents.

A backend supplies a forward and a backward implementation with exactly the signatures of
`fused_blend_reference` and `fused_blend_backward_reference` and wraps them with
`make_fused_blend`, which adds the `jax.custom_vjp`. Batching (`vmap`, over rows or over
stacked layers, where the parameters and the seed inputs carry the batch axis too) goes
through the implementations' own batching rules: `pl.pallas_call` has one; a backend whose
kernels have none (e.g. `jax_triton.triton_call`) wraps its implementations in
`jax.custom_batching.custom_vmap` (or `sequential_vmap`) before passing them here.

Everything is float32 inside; `x` may be float32, bfloat16 or float16 and the output has its
dtype. The child matmuls run at the caller's `precision` (static; `chunks.canonical_precision`:
None = JAX's default matmul precision, TF32 on NVIDIA GPUs since Ampere; HIGHEST = exact).
The telemetry's Gram matrix is always exact (a statistic, not the model's function).

`spec` is a `layer.KasminaSpec` (this package does not import `layer`: `layer` imports it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from kasmina_jax import _struct as struct

from kasmina_jax import blueprints as bp_lib
from kasmina_jax import chunks
from kasmina_jax import telemetry as tel_lib
from kasmina_jax.kernels import sharded

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the contract


@struct.dataclass
class SeedInputs:
  """Per-seed float32 inputs of the fused primitive (leading axis `num_seeds`), derived from
  the stages by `seed_inputs` so that a kernel needs no knowledge of the lifecycle.

  live: 1 where the seed has a child that runs this pass (TRAINING .. FOSSILIZED); a kernel
    does no child work for a seed with `live == 0`.
  blend: weight `b` of the child in the output VALUE: `out = x + b * (g(x) - x)`
    (0 in TRAINING, alpha in GRAFTING, 1 from STABILIZATION on; `eval_alpha` on evaluation
    passes; 0 for seeds that are not live).
  grad_blend: weight of the output cotangent in the child's cotangent: `blend`, plus 1 for
    residual / parallel children in TRAINING (the straight-through estimator).
  host_grad: 1 where the input gradient also flows through the child (`x` enters the child
    unstopped): from STABILIZATION on, on training passes only.
  tables: the blueprint tables of each seed (`layer.seed_tables`): activation one-hot (K, 4),
    glu, diagonal, residual (K,), hidden_mask (K, H).
  """

  live: jax.Array
  blend: jax.Array
  grad_blend: jax.Array
  host_grad: jax.Array
  tables: chunks.SeedTables


class FusedOutputs(NamedTuple):
  """What the fused primitive returns (K = num_seeds, c = chunk_width, N rows).

  out: (N, D) in x's dtype: the layer's output, with the non-finite guard applied (a live
    seed whose child output is non-finite anywhere in this pass contributes `x` unchanged).
  sum_r2: (K,) float32: sum over rows and real nodes of `(g(x) - x)^2` (= `f^2` for residual
    children, `(f - x)^2` for replacement children); differentiable (it carries the child's
    own objective); any value for seeds that are not live or not ok (the wrapper masks it).
  sum_x2: (K,) float32: sum over rows and real nodes of `x^2` (no gradient).
  ok: (K,) bool: the child's output was finite on every row and real node (True where not
    live).
  partials: `telemetry.TelemetryPartials` of `x` about `shift` over the REAL nodes (padded
    node slots of narrow chunks are 0 in every field; the wrapper fills them in), or None
    when the primitive was called with `telemetry=False`. No gradient.
  """

  out: jax.Array
  sum_r2: jax.Array
  sum_x2: jax.Array
  ok: jax.Array
  partials: tel_lib.TelemetryPartials | None


def seed_inputs(spec, seeds, eval_alpha=None) -> SeedInputs:
  """The stage rules of `layer.forward_reference` as per-seed float masks."""
  training, grafting, full_on, live, _ = chunks.stage_masks(seeds.stage)
  tables = chunks.seed_tables(spec.catalog, seeds.blueprint)
  res = tables.residual > 0
  f32 = lambda m: m.astype(jnp.float32)
  if eval_alpha is None:
    alpha = jax.lax.stop_gradient(jnp.asarray(seeds.alpha, jnp.float32))
    blend = jnp.where(full_on, 1.0, jnp.where(grafting, alpha, 0.0))
    grad_blend = blend + f32(training & res)
    host_grad = f32(full_on)
  else:
    # eval_alpha is a constant of the pass (no gradient reaches it).
    ea = jax.lax.stop_gradient(
        jnp.broadcast_to(jnp.asarray(eval_alpha, jnp.float32), (spec.num_seeds,)))
    blend = jnp.where(live & (ea > 0), ea, 0.0)
    grad_blend = blend
    host_grad = jnp.zeros((spec.num_seeds,), jnp.float32)
  return SeedInputs(live=f32(live), blend=blend, grad_blend=grad_blend, host_grad=host_grad,
                    tables=tables)


def fused_blend_reference(spec, telemetry: bool, x2d: jax.Array,
                          params: bp_lib.ChildParams, seed_in: SeedInputs,
                          pre_u: jax.Array | None, shift: jax.Array | None,
                          precision=None) -> FusedOutputs:
  """The fused primitive's forward, in `jnp` (the definition every backend matches).

  spec, telemetry: static. `spec` gives the geometry: `D = spec.dim`, `K = spec.num_seeds`,
    chunk k covers columns `[spec.chunk_offsets[k], + spec.chunk_sizes[k])` of `x2d`
    (`numpy.array_split` sizes: the first `D % K` chunks are one wider), `c =
    spec.chunk_width`, `H = spec.catalog.hidden`; `spec.corr_rows` (Gram subsample: the first
    `min(corr_rows, N)` rows; none when 0) and `spec.dead_eps`.
  x2d: (N, D) float32 / bfloat16 / float16 (read once; compute in float32).
  params: `ChildParams` in float32, chunk width padded to `c` (`w1` (K, c, H), `b1` (K, H),
    `wg` (K, c, G) with G in {0, H}, `bg` (K, G), `w2` (K, H, c), `b2` (K, c), `s` (K, S)
    with S in {0, c}); `w1u` is NOT used here (its GEMM arrives as `pre_u`).
  seed_in: `SeedInputs`.
  pre_u: (N, K, H) float32, `u @ W1u` per seed (parallel wiring), or None.
  shift: (K, c) float32, the telemetry shift, or None when `telemetry` is False.
  precision: static, of the child matmuls (None or a `jax.lax.Precision`; see
    `chunks.canonical_precision`): a backend runs its dots at that precision, resolving
    None with `chunks.effective_precision` where it picks the dot algorithm itself.

  Per seed k with chunk `xk` (N, c_k) in float32, its child (blueprints.py):
    pre = xk @ w1[k] + b1[k] (+ pre_u[:, k]);  a = act_k(pre)
    a  *= sigmoid(xk @ wg[k] + bg[k]) where glu[k]; a *= hidden_mask[k]
    f   = a @ w2[k] + b2[k] (+ s[k] * xk where diagonal[k])
    r   = g(x) - x = f (residual) or f - xk (replacement)
    out = xk + blend[k] * r, written in x's dtype, where live[k] and ok[k]; else xk.
  """
  xb = chunks.to_blocks(spec, x2d).astype(jnp.float32)  # (N, K, c), padded nodes 0
  node = jnp.asarray(spec.node_mask)[None]  # (1, K, c)
  live = seed_in.live[None, :, None] > 0
  f = chunks.child_branch(params, seed_in.tables, xb, pre_u, precision)
  f = jnp.where(node & live, f, 0.0)
  ok = jnp.all(jnp.isfinite(f), axis=(0, 2))
  f = jnp.where(ok[None, :, None], f, 0.0)
  res = seed_in.tables.residual[None, :, None] > 0
  r = jnp.where(node & live, jnp.where(res, f, f - xb), 0.0)
  blend = seed_in.blend[None, :, None]
  out = jnp.where(live & ok[None, :, None], xb + blend * r, xb)
  out2d = chunks.from_blocks(spec, out.astype(x2d.dtype))
  partials = None
  if telemetry:
    partials = _partials_real_nodes(spec, xb, shift)
  return FusedOutputs(out=out2d, sum_r2=jnp.sum(r * r, axis=(0, 2)),
                      sum_x2=jnp.sum(xb * xb, axis=(0, 2)), ok=ok, partials=partials)


def _partials_real_nodes(spec, xb, shift) -> tel_lib.TelemetryPartials:
  node = jnp.asarray(spec.node_mask, jnp.float32)[None]
  n = xb.shape[0]
  m = min(spec.corr_rows, n)
  d = (xb - shift[None]) * node
  dm = d[:m]
  if spec.correlation:
    gram = jnp.einsum("nki,nkj->kij", dm, dm, precision=_HIGHEST)
  else:
    gram = jnp.zeros((spec.num_seeds, 0, 0), jnp.float32)
  return tel_lib.TelemetryPartials(
      count=jnp.asarray(n, jnp.float32), sum=d.sum(0), sumsq=(d * d).sum(0),
      dead=((jnp.abs(xb) <= spec.dead_eps) * node).sum(0),
      corr_count=jnp.asarray(m if spec.correlation else 0, jnp.float32),
      corr_sum=dm.sum(0), gram=gram)


def fused_blend_backward_reference(spec, x2d: jax.Array,
                                   params: bp_lib.ChildParams, seed_in: SeedInputs,
                                   pre_u: jax.Array | None, ok: jax.Array, ct_out: jax.Array,
                                   ct_sum_r2: jax.Array, precision=None):
  """The fused primitive's backward, in `jnp`. Returns `(dx, dparams, dpre_u)`.

  ct_out: (N, D) in x's dtype; ct_sum_r2: (K,) float32 (the other outputs carry no gradient:
  `sum_x2` and the telemetry are taken on stopped activations, `ok` is boolean).
  With `ok`, `live`, `grad_blend`, `host_grad`, `blend` of seed k (all per seed, broadcast over
  rows and nodes), `ctk` the chunk of `ct_out` in float32 and `r` as in the forward:

    ct_f  = live * ok * (grad_blend * ctk + 2 * r * ct_sum_r2)      (N, c_k), real nodes
    dparams[k], dxk_child, dpre_u[:, k] = VJP of the child at (params[k], xk, pre_u[:, k])
    dxk   = ctk + host_grad * live * ok * (dxk_child - replacement * blend * ctk)

  `dparams` is returned for EVERY seed with a nonzero `ct_f` (frozen children included);
  the wrapper stops the gradient of children outside the learning stages. Seeds that are not
  ok get exactly zero child cotangents, so no NaN reaches any gradient. `dx` has x's dtype.
  """
  xb = chunks.to_blocks(spec, x2d).astype(jnp.float32)
  ct = chunks.to_blocks(spec, ct_out).astype(jnp.float32)
  node = jnp.asarray(spec.node_mask)[None]
  on = (seed_in.live > 0) & ok
  gate = node & on[None, :, None]
  res = seed_in.tables.residual[None, :, None] > 0
  xs = jnp.where(gate, xb, 0.0)  # bad seeds: a finite stand-in (their cotangents are zeroed)
  pu = None if pre_u is None else jnp.where(on[None, :, None], pre_u, 0.0)
  f, vjp = jax.vjp(lambda p, x, q: chunks.child_branch(p, seed_in.tables, x, q, precision),
                   params, xs, pu)
  r = jnp.where(gate, jnp.where(res, f, f - xb), 0.0)
  ct_f = jnp.where(gate, seed_in.grad_blend[None, :, None] * ct
                   + 2.0 * r * ct_sum_r2[None, :, None], 0.0)
  dparams, dx_child, dpre_u = vjp(ct_f)
  repl = jnp.where(res, 0.0, 1.0)
  hg = jnp.where(gate, seed_in.host_grad[None, :, None], 0.0)
  dx = ct + hg * (dx_child - repl * seed_in.blend[None, :, None] * ct)
  dx2d = chunks.from_blocks(spec, dx.astype(ct_out.dtype))
  return dx2d, dparams, dpre_u


# ----------------------------------------------------------------------------- custom_vjp


ForwardImpl = Callable[..., FusedOutputs]
BackwardImpl = Callable[..., tuple]


def make_fused_blend(forward_impl: ForwardImpl, backward_impl: BackwardImpl):
  """Wraps a backend's forward / backward implementations into the differentiable primitive
  `fused(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision=None) ->
  FusedOutputs` (`spec`, `telemetry` and `precision` static). The implementations take
  `precision` as their last positional argument."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
  def primitive(spec, telemetry, precision, x2d, params, seed_in, pre_u, shift):
    return forward_impl(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision)

  def fwd(spec, telemetry, precision, x2d, params, seed_in, pre_u, shift):
    outs = forward_impl(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision)
    return outs, (x2d, params, seed_in, pre_u, shift, outs.ok)

  def bwd(spec, telemetry, precision, res, cts):
    del telemetry
    x2d, params, seed_in, pre_u, shift, ok = res
    dx, dparams, dpre_u = backward_impl(spec, x2d, params, seed_in, pre_u, ok, cts.out,
                                        cts.sum_r2, precision)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    return (dx, dparams, zeros(seed_in), dpre_u, None if shift is None else zeros(shift))

  primitive.defvjp(fwd, bwd)

  def fused(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision=None):
    return primitive(spec, bool(telemetry), chunks.canonical_precision(precision), x2d,
                     params, seed_in, pre_u, shift)

  return fused


fused_blend_jnp = make_fused_blend(fused_blend_reference, fused_blend_backward_reference)
"""The contract itself as a backend (`jnp` under XLA): used to test the wrapper."""


# ----------------------------------------------------------------------------- per device


def fused_per_device(fused, row_split: sharded.RowSplit, spec, telemetry: bool, x2d, params, seed_in, pre_u,
                     shift, precision):
  """`fused(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision)` (a backend's
  primitive, `common.make_fused_blend`) with the rows of `x2d` / `pre_u` split over
  `row_split`; same `FusedOutputs` as the unsplit call (sums in another order). A row count that
  does not divide over the axis runs the unsplit call."""
  axis, ways = row_split.axis, row_split.ways
  n = x2d.shape[0]
  if ways == 1 or n % ways:
    return fused(spec, telemetry, x2d, params, seed_in, pre_u, shift, precision)
  local_rows = n // ways
  # The global correlation subsample: the first m rows of the whole batch. Device i holds
  # global rows [i * local_rows, (i + 1) * local_rows); only its first min(m, local_rows) can
  # fall in the subsample.
  m = min(spec.corr_rows, n) if spec.correlation else 0
  sub = min(m, local_rows)
  kernel_spec = dataclasses.replace(spec, corr_rows=0) if spec.correlation else spec
  rep, split = PartitionSpec(), PartitionSpec(axis)

  def body(x_l, params_l, seed_l, pre_u_l, shift_l):
    outs = fused(kernel_spec, telemetry, x_l, params_l, seed_l, pre_u_l, shift_l, precision)
    total = lambda v: jax.lax.psum(v, axis)
    bad = total((~outs.ok).astype(jnp.int32))
    partials = None
    if telemetry:
      p = outs.partials
      corr_sum, gram = p.corr_sum, p.gram
      if spec.correlation:
        first = jax.lax.axis_index(axis) * local_rows
        in_sub = (first + jnp.arange(sub)) < m
        node = jnp.asarray(spec.node_mask, jnp.float32)[None]
        xb = chunks.to_blocks(spec, x_l[:sub]).astype(jnp.float32)
        d = jnp.where(in_sub[:, None, None], (xb - shift_l[None]) * node, 0.0)
        corr_sum = d.sum(0)
        gram = jnp.einsum("nki,nkj->kij", d, d, precision=_HIGHEST)
      partials = tel_lib.TelemetryPartials(
          count=total(p.count), sum=total(p.sum), sumsq=total(p.sumsq), dead=total(p.dead),
          corr_count=jnp.asarray(m, jnp.float32), corr_sum=total(corr_sum), gram=total(gram))
    return outs._replace(sum_r2=total(outs.sum_r2), sum_x2=total(outs.sum_x2), ok=bad == 0,
                         partials=partials)

  partial_specs = None
  if telemetry:
    partial_specs = tel_lib.TelemetryPartials(count=rep, sum=rep, sumsq=rep, dead=rep,
                                              corr_count=rep, corr_sum=rep, gram=rep)
  out_specs = FusedOutputs(out=split, sum_r2=rep, sum_x2=rep, ok=rep,
                                  partials=partial_specs)
  in_specs = (split, jax.tree.map(lambda _: rep, params), jax.tree.map(lambda _: rep, seed_in),
              None if pre_u is None else split, None if shift is None else rep)
  return sharded.shard_map(body, row_split.mesh, in_specs, out_specs)(x2d, params, seed_in, pre_u, shift)


# ----------------------------------------------------------------------------- the wrapper


def _pad_partials(spec, p: tel_lib.TelemetryPartials, shift) -> tel_lib.TelemetryPartials:
  """Fills the padded node slots with what a zero activation gives (as the reference, whose
  padded nodes hold 0): a real-node-only kernel needs no knowledge of the padding."""
  if spec.dim % spec.num_seeds == 0:
    return p
  pad = jnp.asarray(~spec.node_mask, jnp.float32)
  sp = shift * pad  # -(0 - shift) on padded slots
  n, m = p.count, p.corr_count
  gram = p.gram
  if spec.correlation:
    gram = (gram - p.corr_sum[:, :, None] * sp[:, None, :] - sp[:, :, None] * p.corr_sum[:, None, :]
            + m * sp[:, :, None] * sp[:, None, :])
  return p.replace(sum=p.sum - n * sp, sumsq=p.sumsq + n * sp * sp, dead=p.dead + pad * n,
                   corr_sum=p.corr_sum - m * sp, gram=gram)


def apply_guard(spec, x2d: jax.Array, out2d: jax.Array,
                ok: jax.Array) -> jax.Array:
  """For backends whose forward writes the output before it knows `ok` (a child may turn
  non-finite on a later row): rewrites the chunks of bad seeds to `x`. The rewrite runs only
  when a bad seed exists (`lax.cond`; under `vmap` it becomes a select over the output)."""
  good_cols = chunks.from_blocks(
      spec, jnp.broadcast_to(ok[:, None], (spec.num_seeds, spec.chunk_width)))
  return jax.lax.cond(jnp.all(ok), lambda: out2d,
                      lambda: jnp.where(good_cols[None, :], out2d, x2d))


def forward(spec, params: bp_lib.ChildParams, seeds, x: jax.Array, *,
            u=None, telemetry=None, eval_alpha=None, fused=fused_blend_jnp, precision=None,
            row_split: sharded.RowSplit | None = None):
  """`layer.forward_reference` through a fused primitive `fused` (see `make_fused_blend`),
  the child matmuls at `precision`; with `row_split`, the primitive runs per device on its rows
  (`fused_per_device`)."""
  precision = chunks.canonical_precision(precision)
  catalog = spec.catalog
  lead = x.shape[:-1]
  rows = int(np.prod(lead)) if lead else 1
  x2d = x.reshape((rows, spec.dim))
  evaluating = eval_alpha is not None
  training, _, full_on, live, learning = chunks.stage_masks(seeds.stage)
  seed_in = seed_inputs(spec, seeds, eval_alpha)
  host_grad = full_on & ~jnp.asarray(evaluating)

  # Children learn only in learning stages: stop the gradient of the others here, so that a
  # backend returns parameter cotangents for every seed and needs no stage logic.
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  p_eff = jax.tree.map(
      lambda p: jnp.where(learning.reshape((-1,) + (1,) * (p.ndim - 1)), p,
                          jax.lax.stop_gradient(p)), params32)
  # A chunk-wired child reads only its chunk (W1), a parallel-wired one only `u` (W1u).
  par = seed_in.tables.parallel[:, None, None] > 0
  p_eff = p_eff.replace(w1=jnp.where(par, 0.0, p_eff.w1), w1u=jnp.where(par, p_eff.w1u, 0.0))
  pre_u = None
  if catalog.any_parallel:
    u2 = u.reshape((rows, spec.input_dim)).astype(jnp.float32)
    pre_u = chunks.parallel_first_layer(u2, p_eff.w1u, host_grad.astype(jnp.float32),
                                        live & (seed_in.tables.parallel > 0), precision)

  take_telemetry = telemetry is not None and not evaluating
  tel = shift = None
  if take_telemetry:
    first = chunks.to_blocks(spec, jax.lax.stop_gradient(x2d[:1])).astype(jnp.float32)[0]
    tel = tel_lib.with_shift(telemetry, first)
    shift = tel.shift

  if row_split is None:
    outs = fused(spec, take_telemetry, x2d, p_eff, seed_in, pre_u, shift, precision)
  else:
    outs = fused_per_device(fused, row_split, spec, take_telemetry, x2d, p_eff, seed_in, pre_u,
                            shift, precision)
  ok = outs.ok | ~live

  res_seed = seed_in.tables.residual > 0
  sum_x2 = jax.lax.stop_gradient(outs.sum_x2)
  # A bad seed's child counts as f = 0 (as in the reference): residual 0, replacement ||x||^2.
  sum_r2 = jnp.where(ok, outs.sum_r2, jnp.where(res_seed, 0.0, sum_x2))
  if evaluating:
    sum_r2 = jax.lax.stop_gradient(sum_r2)
  recon_ratio = sum_r2 / jnp.maximum(sum_x2, 1e-30)
  objective = jnp.where(res_seed, spec.trust_penalty * sum_r2, sum_r2) / rows
  child_loss = jnp.sum(jnp.where(training & ok, objective, 0.0))
  nan = jnp.full_like(objective, jnp.nan)
  aux_objective = jnp.where(live, jax.lax.stop_gradient(objective), nan)
  aux_ratio = jnp.where(live, jax.lax.stop_gradient(recon_ratio), nan)

  new_tel = None
  if take_telemetry:
    partials = jax.tree.map(jax.lax.stop_gradient, _pad_partials(spec, outs.partials, shift))
    # The kernel summed every row in passing: all of them are merged (`telemetry_every`
    # saves the reference path a read of the activations; here there is none to save).
    new_tel = tel_lib.scheduled(tel, lambda t: tel_lib.merge(t, partials))
    new_tel = new_tel.replace(nonfinite=new_tel.nonfinite | (live & ~ok))

  aux = chunks.StepAux(child_loss=child_loss, objective=aux_objective, recon_ratio=aux_ratio,
                          nonfinite=live & ~ok, telemetry=new_tel)
  return outs.out.reshape(x.shape), aux

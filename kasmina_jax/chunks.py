"""What the chunked layer's reference (`layer`) and its kernels (`kernels`) share.

The chunk geometry (`to_blocks` / `from_blocks`), the stage rules as masks (`stage_masks`),
the per-seed blueprint tables (`seed_tables`), the child's math (`child_branch`), the parallel
children's first-layer GEMM (`parallel_first_layer`), the forward's report (`StepAux`), and
the validation of a matmul `precision` (`canonical_precision`). This module sits below both
`layer` and `kernels`, so that neither imports the other's helpers (docs/design.md, "Layering":
`layer` imports `kernels` for the `impl` dispatch; `kernels` imports only this module).
`layer` re-exports every name here that it exported before.

`spec` arguments are `layer.KasminaSpec`s; only their static geometry (`dim`, `num_seeds`)
is read here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kasmina_jax import _struct as struct
from kasmina_jax import blueprints as bp_lib
from kasmina_jax.lifecycle import Stage

# ----------------------------------------------------------------------------- precision

_PRECISION_NAMES = {
    "default": jax.lax.Precision.DEFAULT, "fastest": jax.lax.Precision.DEFAULT,
    "bfloat16": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH, "tensorfloat32": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST, "float32": jax.lax.Precision.HIGHEST,
}


def canonical_precision(precision) -> jax.lax.Precision | None:
  """Validates the `precision` of the child matmuls: None (JAX's default matmul precision,
  i.e. `jax.default_matmul_precision` where set, else XLA's default: TF32 on NVIDIA GPUs
  since Ampere, as for `jnp.dot`), a `jax.lax.Precision`, or one of the names JAX accepts
  for them ("default", "high", "highest"; "bfloat16", "tensorfloat32", "float32").
  Returns None or a `jax.lax.Precision` (hashable: a static argument). Raises ValueError
  naming `precision` otherwise (a pair of precisions or a `DotAlgorithmPreset` included)."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str) and precision.lower() in _PRECISION_NAMES:
    return _PRECISION_NAMES[precision.lower()]
  raise ValueError(
      "precision: expected None (JAX's default), 'default', 'high', 'highest' (or "
      "'bfloat16', 'tensorfloat32', 'float32') or a jax.lax.Precision, got "
      f"{precision!r}")


def effective_precision(precision) -> jax.lax.Precision:
  """The precision a kernel that picks its own dot algorithm must use: `precision` itself,
  or, for None, JAX's default matmul precision at trace time (`jax_default_matmul_precision`,
  e.g. set by the `jax.default_matmul_precision` context manager; DEFAULT when unset). A
  config value that names a dot algorithm rather than a precision counts as HIGHEST (the
  exact path: never less precise than asked)."""
  precision = canonical_precision(precision)
  if precision is not None:
    return precision
  configured = getattr(jax.config, "jax_default_matmul_precision", None)
  if configured is None:
    return jax.lax.Precision.DEFAULT
  try:
    return canonical_precision(configured) or jax.lax.Precision.DEFAULT
  except ValueError:
    return jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- chunk geometry


def to_blocks(spec, x: jax.Array) -> jax.Array:
  """(..., D) -> (..., K, c): chunks, the narrower ones zero-padded to the widest."""
  q, r = divmod(spec.dim, spec.num_seeds)
  lead = x.shape[:-1]
  if r == 0:
    return x.reshape(lead + (spec.num_seeds, q))
  wide = x[..., : r * (q + 1)].reshape(lead + (r, q + 1))
  narrow = x[..., r * (q + 1):].reshape(lead + (spec.num_seeds - r, q))
  narrow = jnp.pad(narrow, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
  return jnp.concatenate([wide, narrow], axis=-2)


def from_blocks(spec, blocks: jax.Array) -> jax.Array:
  """Inverse of `to_blocks`."""
  q, r = divmod(spec.dim, spec.num_seeds)
  lead = blocks.shape[:-2]
  if r == 0:
    return blocks.reshape(lead + (spec.dim,))
  wide = blocks[..., :r, :].reshape(lead + (r * (q + 1),))
  narrow = blocks[..., r:, :q].reshape(lead + ((spec.num_seeds - r) * q,))
  return jnp.concatenate([wide, narrow], axis=-1)


# ----------------------------------------------------------------------------- the report


@struct.dataclass
class StepAux:
  """What one forward pass reports besides its output (per seed unless said otherwise)."""

  child_loss: jax.Array  # scalar, differentiable: the TRAINING seeds' objectives, summed
  # (K,) the child's own objective as far as the forward knows it (NaN where no live child):
  # reconstruction loss, or for residual / parallel children the penalty lambda mean ||f||^2
  # only; `whole_objective` adds <dL/dout, f> from the gradients (the train step does).
  objective: jax.Array
  recon_ratio: jax.Array  # (K,) ||g(x)-x||^2 / ||x||^2 (NaN where no live child)
  nonfinite: jax.Array  # (K,) bool: the child's output was non-finite this step
  telemetry: Any  # the updated TelemetryState, or None on evaluation passes


# ----------------------------------------------------------------------------- stages


def stage_masks(stage: jax.Array):
  """`(training, grafting, full_on, live, learning)` bool masks of `stage` (docs/design.md, "Stage
  table"; the reference and every kernel path read the stages through this one function)."""
  s = stage
  training = s == Stage.TRAINING
  grafting = s == Stage.GRAFTING
  full_on = (s >= Stage.STABILIZATION) & (s <= Stage.FOSSILIZED)
  live = training | grafting | full_on
  # Gradients reach FOSSILIZED children too: whether a fossil learns is the optimizer's call
  # (`LifecycleConfig.fossil`; `optim.learning_mask` freezes it in "frozen" mode).
  learning = training | grafting | (s == Stage.FINE_TUNING) | (s == Stage.FOSSILIZED)
  return training, grafting, full_on, live, learning


# ----------------------------------------------------------------------------- per-seed tables


@struct.dataclass
class SeedTables:
  """Per-seed float32 lookups of the seed's blueprint and stage, computed once a pass."""

  act: jax.Array  # (K, 4) one-hot activation
  glu: jax.Array  # (K,)
  diagonal: jax.Array  # (K,)
  residual: jax.Array  # (K,)
  parallel: jax.Array  # (K,)
  hidden_mask: jax.Array  # (K, H)


def seed_tables(catalog: bp_lib.Catalog, blueprint: jax.Array) -> SeedTables:
  b = jnp.clip(blueprint, 0, len(catalog.blueprints) - 1)
  f = lambda a: jnp.asarray(a, jnp.float32)[b]
  return SeedTables(
      act=jax.nn.one_hot(jnp.asarray(catalog.act_id)[b], len(bp_lib.ACTIVATIONS)),
      glu=f(catalog.glu), diagonal=f(catalog.diagonal), residual=f(catalog.residual),
      parallel=f(catalog.parallel), hidden_mask=f(catalog.hidden_mask))


# ----------------------------------------------------------------------------- the child


def _activate(pre: jax.Array, act: jax.Array) -> jax.Array:
  """Per-seed activation: `pre` (N, K, H), `act` (K, 4) one-hot over ACTIVATIONS."""
  outs = (pre, jax.nn.relu(pre), jax.nn.gelu(pre, approximate=True), jnp.tanh(pre))
  return sum(a[None, :, None] * o for a, o in zip(jnp.moveaxis(act, -1, 0), outs))


def child_branch(params: bp_lib.ChildParams, tables: SeedTables, xb: jax.Array,
                 pre_u: jax.Array | None, precision=None) -> jax.Array:
  """f of every seed: `xb` (N, K, c) float32, `pre_u` (N, K, H) or None -> (N, K, c).

  `g(x) = x + f` for residual children and `g(x) = f` for replacement children. The matmuls
  run at `precision` (see `canonical_precision`; None: JAX's default).
  """
  pre = jnp.einsum("nkc,kch->nkh", xb, params.w1, precision=precision) + params.b1[None]
  if pre_u is not None:
    pre = pre + pre_u
  a = _activate(pre, tables.act)
  if params.wg.shape[-1]:
    gate = jax.nn.sigmoid(jnp.einsum("nkc,kch->nkh", xb, params.wg, precision=precision)
                          + params.bg[None])
    a = a * jnp.where(tables.glu[None, :, None] > 0, gate, 1.0)
  a = a * tables.hidden_mask[None]
  f = jnp.einsum("nkh,khc->nkc", a, params.w2, precision=precision) + params.b2[None]
  if params.s.shape[-1]:
    f = f + tables.diagonal[None, :, None] * params.s[None] * xb
  return f


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _masked_input_matmul(u: jax.Array, w: jax.Array, host_grad: jax.Array,
                         precision) -> jax.Array:
  """`u (N, Din) @ w (K, Din, H) -> (N, K, H)`; the gradient reaches `u` only through the
  seeds where `host_grad` (K,) is set (one GEMM, no per-seed stop_gradient copies)."""
  return jnp.einsum("nd,kdh->nkh", u, w, precision=precision)


def _mim_fwd(u, w, host_grad, precision):
  return _masked_input_matmul(u, w, host_grad, precision), (u, w, host_grad)


def _mim_bwd(precision, res, ct):
  u, w, host_grad = res
  # Zero the weights of seeds without host gradient (and non-finite ones, whose cotangent the
  # non-finite guard has zeroed): 0 * NaN would otherwise reach `u`'s gradient.
  w_host = jnp.where((host_grad[:, None, None] > 0) & jnp.isfinite(w), w, 0.0)
  du = jnp.einsum("nkh,kdh->nd", ct, w_host, precision=precision)
  dw = jnp.einsum("nd,nkh->kdh", u, ct, precision=precision)
  return du, dw, jnp.zeros_like(host_grad)


_masked_input_matmul.defvjp(_mim_fwd, _mim_bwd)


def parallel_first_layer(u2: jax.Array, w1u: jax.Array, host_grad: jax.Array,
                         live_parallel: jax.Array, precision=None) -> jax.Array:
  """The parallel children's first layer `u @ W1u` for every seed, one GEMM at `precision`;
  skipped (zeros) while no parallel-wired child is live, so dormant parallel seeds cost no
  GEMM."""
  k, _, h = w1u.shape
  return jax.lax.cond(
      jnp.any(live_parallel),
      lambda: _masked_input_matmul(u2, w1u, host_grad, precision),
      lambda: jnp.zeros((u2.shape[0], k, h), jnp.float32))


__all__ = ["SeedTables", "StepAux", "canonical_precision", "child_branch",
           "effective_precision", "from_blocks", "parallel_first_layer", "seed_tables",
           "stage_masks", "to_blocks"]

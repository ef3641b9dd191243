"""Per-seed health telemetry: step accumulators and the end-of-epoch health report.

Sums are taken about a per-node `shift` (the first row the accumulator saw), so the variance
`S2/n - (S1/n)^2` does not cancel catastrophically on activations with a large mean. The
correlation Gram matrix is taken on the first `corr_rows` rows of each step (rows arrive
shuffled), which bounds its cost at `2 * corr_rows * D * c` FLOPs a step.

A step's contribution is a `TelemetryPartials` (what a kernel computes in its pass over the
activations); `merge` adds it into the epoch's `TelemetryState`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from kasmina_jax import _struct as struct

DEAD_EPS = 1e-6
DEAD_FRACTION = 0.99
# Each training pass measures the health telemetry on a share of its rows: a block of
# ceil(rows / every) rows, at least TELEMETRY_MIN_ROWS (so a batch that small is measured
# whole), that moves along the batch from pass to pass (`rows_for_pass`). The epoch report's
# figures are averages over the measured rows, as they always were: the same statistics on a
# quarter of the rows of a large batch (the correlation's Gram matrix keeps its own first
# `corr_rows` rows of every pass). Every pass measures, so there is no `lax.cond` (on a
# GPU its predicate is read on the host, which stalls the step: issue 19's profile) and every
# epoch's report has data. 1 measures every row.
DEFAULT_TELEMETRY_EVERY = 4
TELEMETRY_MIN_ROWS = 256


def measured_rows(rows: int, every: int) -> int:
  """How many of a pass's `rows` the telemetry reads (static)."""
  share = -(-rows // every)
  return min(rows, max(share, TELEMETRY_MIN_ROWS))


def rows_for_pass(x2d: jax.Array, passes: jax.Array, every: int) -> jax.Array:
  """The rows of `x2d` (N, D) that pass number `passes` measures: the block
  `passes % every` of size `measured_rows(N, every)` (the last block ends at row N)."""
  n = x2d.shape[0]
  size = measured_rows(n, every)
  if size == n:
    return x2d
  start = jnp.minimum((passes % every) * size, n - size)
  return jax.lax.dynamic_slice_in_dim(x2d, start.astype(jnp.int32), size, axis=0)


@struct.dataclass
class TelemetryPartials:
  """One step's sums over rows, per seed and node (nodes padded to the widest chunk)."""

  count: jax.Array  # float32 (): rows
  sum: jax.Array  # float32 (K, c): sum of (a - shift)
  sumsq: jax.Array  # float32 (K, c): sum of (a - shift)^2
  dead: jax.Array  # float32 (K, c): rows with |a| <= dead_eps
  corr_count: jax.Array  # float32 (): rows in the correlation subsample
  corr_sum: jax.Array  # float32 (K, c): sum of (a - shift) over the subsample
  gram: jax.Array  # float32 (K, c, c) or (K, 0, 0): sum of (a - shift)(a - shift)^T


@struct.dataclass
class TelemetryState:
  """Epoch accumulators of one layer (leading axis `num_seeds` except the counts)."""

  shift: jax.Array  # float32 (K, c)
  has_shift: jax.Array  # bool ()
  count: jax.Array
  sum: jax.Array
  sumsq: jax.Array
  dead: jax.Array
  corr_count: jax.Array
  corr_sum: jax.Array
  gram: jax.Array
  grad_norm_sum: jax.Array  # float32 (K,): sum over steps of the child's gradient norm
  grad_norm_sumsq: jax.Array  # float32 (K,)
  grad_steps: jax.Array  # float32 (K,)
  nonfinite: jax.Array  # bool (K,): a child's output was non-finite on some step
  passes: jax.Array  # int32 (): training passes since the reset (measured or not)


# The three health signals of the design (docs/design.md, "Telemetry"), in the order every
# (K, 3) health matrix, plot and
# event record uses.
HEALTH_FIELDS = ("chunk_variance", "dead_node_ratio", "avg_inter_node_correlation")


@struct.dataclass
class HealthReport:
  """End-of-epoch health of one layer's seeds; every leaf has leading axis `num_seeds`."""

  chunk_variance: jax.Array  # mean over the chunk's nodes of each node's variance
  dead_node_ratio: jax.Array  # fraction of the chunk's nodes that are dead
  avg_inter_node_correlation: jax.Array  # mean |corr| over distinct node pairs
  alpha: jax.Array  # blend weight (active seeds; 0 otherwise)
  objective: jax.Array  # the child's own objective, running mean (NaN where no child)
  recon_ratio: jax.Array  # ||g(x) - x||^2 / ||x||^2 of the last step (NaN where no child)
  gradient_variance: jax.Array  # variance over the epoch's steps of the child's grad norm
  param_count: jax.Array  # int32: active child parameters (0 where no child)
  param_bytes: jax.Array  # int32
  flops_per_row: jax.Array  # int32: child FLOPs per row (0 where no child)
  nonfinite: jax.Array  # bool: the child's output went non-finite this epoch


def init_telemetry(num_seeds: int, chunk_width: int, *, correlation: bool = True) -> TelemetryState:
  """Empty accumulators for `num_seeds` chunks of at most `chunk_width` nodes."""
  k, c = num_seeds, chunk_width
  g = c if correlation else 0
  z = jnp.zeros((k, c), jnp.float32)
  zk = jnp.zeros((k,), jnp.float32)
  return TelemetryState(
      shift=z, has_shift=jnp.zeros((), bool), count=jnp.zeros((), jnp.float32), sum=z,
      sumsq=z, dead=z, corr_count=jnp.zeros((), jnp.float32), corr_sum=z,
      gram=jnp.zeros((k, g, g), jnp.float32), grad_norm_sum=zk, grad_norm_sumsq=zk,
      grad_steps=zk, nonfinite=jnp.zeros((k,), bool), passes=jnp.zeros((), jnp.int32))


def with_shift(tel: TelemetryState, first_row: jax.Array) -> TelemetryState:
  """Sets the shift from the first row ever seen (`first_row` of shape (K, c))."""
  first_row = jnp.where(jnp.isfinite(first_row), first_row, 0.0).astype(jnp.float32)
  return tel.replace(shift=jnp.where(tel.has_shift, tel.shift, first_row),
                     has_shift=jnp.ones((), bool))


def partials_reference(blocks: jax.Array, shift: jax.Array, *, corr_rows: int,
                       correlation: bool, dead_eps: float = DEAD_EPS,
                       corr_blocks: jax.Array | None = None) -> TelemetryPartials:
  """Sums of one step, `blocks` of shape (N, K, c) (padded nodes must be 0). The Gram matrix
  is taken on the first `corr_rows` rows of `corr_blocks` (default: `blocks`)."""
  a = blocks.astype(jnp.float32)
  d = a - shift[None]
  n = a.shape[0]
  corr = d if corr_blocks is None else corr_blocks.astype(jnp.float32) - shift[None]
  m = min(corr_rows, corr.shape[0]) if correlation else 0
  ds = corr[:m]
  gram = (jnp.einsum("nki,nkj->kij", ds, ds, precision=jax.lax.Precision.HIGHEST)
          if correlation else jnp.zeros((shift.shape[0], 0, 0), jnp.float32))
  return TelemetryPartials(
      count=jnp.asarray(n, jnp.float32), sum=d.sum(0), sumsq=(d * d).sum(0),
      dead=(jnp.abs(a) <= dead_eps).astype(jnp.float32).sum(0),
      corr_count=jnp.asarray(m, jnp.float32), corr_sum=ds.sum(0), gram=gram)


def merge(tel: TelemetryState, p: TelemetryPartials) -> TelemetryState:
  """Adds one step's partial sums into the epoch accumulators (non-finite sums are dropped)."""
  # One finiteness check: the sums of squares and the Gram matrix's diagonal are finite
  # exactly when every measured value is (then the sums and off-diagonal terms are bounded
  # by them); one reduction instead of four a step (each a kernel on a GPU).
  ok = jnp.isfinite(jnp.sum(p.sumsq) + jnp.sum(jnp.diagonal(p.gram, axis1=-2, axis2=-1)))
  add = lambda acc, x: jnp.where(ok, acc + x, acc)
  return tel.replace(count=add(tel.count, p.count), sum=add(tel.sum, p.sum),
                     sumsq=add(tel.sumsq, p.sumsq), dead=add(tel.dead, p.dead),
                     corr_count=add(tel.corr_count, p.corr_count),
                     corr_sum=add(tel.corr_sum, p.corr_sum), gram=add(tel.gram, p.gram))


def scheduled(tel: TelemetryState, measure) -> TelemetryState:
  """One training pass's telemetry: `measure(tel)` (the pass's partial sums, on the rows
  `rows_for_pass` picks, merged in); `passes` advances."""
  return measure(tel).replace(passes=tel.passes + 1)


def record_gradients(tel: TelemetryState, child_grad_norm: jax.Array,
                     learning: jax.Array) -> TelemetryState:
  """Adds one step's per-seed child gradient norms (only where `learning`)."""
  g = child_grad_norm.astype(jnp.float32)
  use = learning & jnp.isfinite(g)
  g = jnp.where(use, g, 0.0)
  return tel.replace(grad_norm_sum=tel.grad_norm_sum + g,
                     grad_norm_sumsq=tel.grad_norm_sumsq + g * g,
                     grad_steps=tel.grad_steps + use.astype(jnp.float32))


def reset(tel: TelemetryState) -> TelemetryState:
  """Fresh accumulators for the next epoch (same shapes)."""
  k, c = tel.sum.shape
  return init_telemetry(k, c, correlation=tel.gram.shape[-1] > 0)


def node_statistics(tel: TelemetryState, node_mask: jax.Array, *,
                    dead_fraction: float = DEAD_FRACTION):
  """Per-seed (chunk_variance, dead_node_ratio, avg_inter_node_correlation)."""
  mask = node_mask.astype(jnp.float32)
  width = jnp.maximum(mask.sum(-1), 1.0)
  n = jnp.maximum(tel.count, 1.0)
  mean_d = tel.sum / n
  var = jnp.maximum(tel.sumsq / n - mean_d * mean_d, 0.0) * mask
  chunk_variance = var.sum(-1) / width
  dead = (tel.dead >= dead_fraction * tel.count) & (tel.count > 0) & node_mask
  dead_ratio = dead.astype(jnp.float32).sum(-1) / width
  if tel.gram.shape[-1] == 0:
    corr_avg = jnp.zeros_like(chunk_variance)
  else:
    m = jnp.maximum(tel.corr_count, 1.0)
    mu = tel.corr_sum / m
    cov = tel.gram / m - mu[:, :, None] * mu[:, None, :]
    v = jnp.diagonal(cov, axis1=-2, axis2=-1)
    scale = jnp.maximum(tel.sumsq.max() / n, 1.0)  # variance scale of the layer
    has_var = (v > 1e-12 * scale) & node_mask
    denom = jnp.sqrt(jnp.where(has_var, v, 1.0))
    corr = cov / (denom[:, :, None] * denom[:, None, :])
    corr = jnp.clip(jnp.abs(corr), 0.0, 1.0)
    pair = has_var[:, :, None] & has_var[:, None, :]
    pair_mask = node_mask[:, :, None] & node_mask[:, None, :]
    eye = jnp.eye(corr.shape[-1], dtype=bool)[None]
    off = pair_mask & ~eye
    n_pairs = off.astype(jnp.float32).sum((-1, -2))
    corr_sum = jnp.where(off & pair, corr, 0.0).sum((-1, -2))
    corr_avg = jnp.where(n_pairs > 0, corr_sum / jnp.maximum(n_pairs, 1.0), 0.0)
  return chunk_variance, dead_ratio, corr_avg

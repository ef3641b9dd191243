"""Comparisons that decide, made robust to float noise (docs/design.md, "Decision tolerance").

The same run on one device and on several computes every measurement (telemetry sums, losses,
counterfactual deltas) with its additions in another order, so the values that drive a
decision differ in their last bits, and after some optimizer steps by more. A decision taken
with a raw `>` or an `argmax` flips whenever two candidates are within that noise of each
other (or a value is within it of its threshold). Here:

- rankings (`stable_rank`, `best_index`) put scores that are within a tolerance of their
  neighbour in descending order into one tie group (single linkage: a chain of near-equal
  scores is one group), and order a tie group by index, lower first. Two scores that are
  equal up to noise are therefore always tied, wherever they lie (rounding to a fixed grid
  would still split a tie that straddles a grid line);
- threshold comparisons (`greater`, `less`, `at_least`, `at_most`) count a value within the
  tolerance of its threshold on one fixed side: "not greater" for `greater` and `less`,
  "yes" for `at_least` and `at_most`;
- `snap_difference` reports a difference of two measurements that is within the tolerance of
  their magnitude as exactly 0 (a counterfactual delta of a child that changes nothing).

The tolerance of a comparison between `a` and `b` is `rtol * max(|a|, |b|) + atol` (non-finite
magnitudes count 0, so an infinite "best so far" does not swallow the comparison). A value
that lands within noise of a tolerance boundary itself can still go either way; what no
longer flips are exact ties and values at their threshold, the cases that arise in practice
(equal health signals, a child whose output is still zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Relative and absolute tolerance of every decision. Telemetry sums of one device and of two
# agree to ~1e-6 relative in float32; the rtol leaves two orders of magnitude for the drift of
# a few optimizer steps. Need scores live in [0, 1], losses are O(1).
DECISION_RTOL = 1e-4
DECISION_ATOL = 1e-6


def _magnitude(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


def tolerance(a, b, rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """`rtol * max(|a|, |b|) + atol`, non-finite magnitudes counting 0."""
  return rtol * jnp.maximum(_magnitude(a), _magnitude(b)) + atol


def greater(a, b, rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """`a > b` by more than the tolerance (a tie is not greater)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return a > b + tolerance(a, b, rtol, atol)


def less(a, b, rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """`a < b` by more than the tolerance (a tie is not less)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return a < b - tolerance(a, b, rtol, atol)


def at_least(a, b, rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """`a >= b` up to the tolerance (a tie counts)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return a >= b - tolerance(a, b, rtol, atol)


def at_most(a, b, rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """`a <= b` up to the tolerance (a tie counts)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return a <= b + tolerance(a, b, rtol, atol)


def snap_difference(a, b, rtol: float = DECISION_RTOL,
                    atol: float = DECISION_ATOL) -> jax.Array:
  """`a - b`, exactly 0 where it is within the tolerance of `a` and `b`'s magnitude."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  d = a - b
  return jnp.where(jnp.abs(d) <= tolerance(a, b, rtol, atol), jnp.zeros_like(d), d)


def stable_rank(score: jax.Array, eligible: jax.Array | None = None,
                rtol: float = DECISION_RTOL, atol: float = DECISION_ATOL) -> jax.Array:
  """(K,) int32: rank of each entry of the 1-D `score` by descending score among `eligible`
  (default: all), 0 the best. Scores within the tolerance of their neighbour in that order
  are tied (one group per chain) and ranked by index, lower first; a non-finite score is
  tied with nothing. Ineligible entries rank after every eligible one, in index order."""
  score = jnp.asarray(score, jnp.float32)
  if score.ndim != 1:
    raise ValueError(f"score: expected a 1-D array, got shape {score.shape}")
  k = score.shape[0]
  eligible = (jnp.ones((k,), bool) if eligible is None
              else jnp.broadcast_to(jnp.asarray(eligible, bool), (k,)))
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  index = jnp.arange(k, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(eligible, -score, jnp.inf), stable=True).astype(jnp.int32)
  s, e = score[order], eligible[order]
  near = jnp.abs(s[1:] - s[:-1]) <= tolerance(s[1:], s[:-1], rtol, atol)
  tied = near & e[1:] & e[:-1]
  group = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(~tied, dtype=jnp.int32)])
  # Within a tie group, by index: sort the positions by (group, index).
  final = jnp.lexsort((order, group))
  return jnp.zeros((k,), jnp.int32).at[order[final]].set(index)


def best_index(scores: jax.Array, rtol: float = DECISION_RTOL,
               atol: float = DECISION_ATOL) -> jax.Array:
  """int32 index of the best score along the last axis: the lowest index of the top tie
  group (`stable_rank`); leading axes are batch axes."""
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim == 0:
    raise ValueError("scores: expected at least one axis, got a scalar")
  flat = scores.reshape((-1, scores.shape[-1]))
  ranks = jax.vmap(lambda s: stable_rank(s, None, rtol, atol))(flat)
  return jnp.argmin(ranks, axis=-1).astype(jnp.int32).reshape(scores.shape[:-1])

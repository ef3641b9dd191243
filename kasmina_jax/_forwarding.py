"""A `jit` whose state argument comes back without copies of the leaves it did not change.

A jitted step that returns its state pytree makes XLA write every output leaf into a fresh
buffer, copies of the unchanged ones included: a Kasmina train step leaves most of its ~200
state leaves alone (the controller's memory, dormant layers' seeds, frozen children and their
optimizer moments), and on a GPU each copy is one more node to launch and one more buffer to
allocate on the host: the step became bound by the host at 1024 rows (issue 19's profile).

`forwarding_jit(fun, ...)` traces `fun(state, *args) -> (new_state, aux)` once per signature
as `jax.jit` does, marks every leaf of `new_state` that *is* the input leaf at the same place
(the same tracer: the function returned it untouched), leaves those out of the compiled
program's outputs (which are the computed leaves as a flat list, plus their positions as
static data), and puts the caller's own arrays back in their places. Values are exactly
those of `jax.jit(fun)`; a leaf that was recomputed, even to an equal value, is still an
output. `jax.jit`'s `donate_argnums` would also avoid the copies but deletes the caller's old
state, which a training loop keeps for rollback and tests compare against.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax


class _Plan:
  """Which of the state's leaves the compiled program computed (`positions`, in flattening
  order; None: the structure changed, the output is the whole new state). A pytree node with
  no children whose aux data is the plan, so that it comes out of `jit` as static data."""

  __slots__ = ("positions",)

  def __init__(self, positions):
    self.positions = positions


jax.tree_util.register_pytree_node(_Plan, lambda p: ((), p.positions), lambda aux, _: _Plan(aux))


def split_computed(old: Any, new: Any) -> tuple[Any, _Plan]:
  """`(computed leaves of new, plan)`: the leaves of `new` that are not `old`'s leaf at the
  same place (identity), and their positions; `(new, _Plan(None))` when the structures
  differ."""
  old_leaves, old_def = jax.tree.flatten(old)
  new_leaves, new_def = jax.tree.flatten(new)
  if old_def != new_def:
    return new, _Plan(None)
  positions = tuple(i for i, (n, o) in enumerate(zip(new_leaves, old_leaves)) if n is not o)
  return [new_leaves[i] for i in positions], _Plan(positions)


def merge_computed(old: Any, computed: Any, plan: _Plan) -> Any:
  """The full new state from `old` and `split_computed`'s output."""
  if plan.positions is None:
    return computed
  old_leaves, old_def = jax.tree.flatten(old)
  for i, x in zip(plan.positions, computed):
    old_leaves[i] = x
  return jax.tree.unflatten(old_def, old_leaves)


class ForwardingJit:
  """`fun(state, *args, **kwargs) -> (new_state, aux)`, jitted, unchanged leaves forwarded.

  `lower` / `trace` are those of the inner `jax.jit` (whose outputs are the computed leaves,
  `aux` and the static plan); under an outer trace (`jit`, `vmap`, `scan`) the call works on
  tracers alike."""

  def __init__(self, fun: Callable, **jit_kwargs):
    def split(state, *args, **kwargs):
      new_state, aux = fun(state, *args, **kwargs)
      computed, plan = split_computed(state, new_state)
      return computed, aux, plan

    functools.update_wrapper(self, fun)
    self._jitted = jax.jit(functools.wraps(fun)(split), **jit_kwargs)
    self.lower = self._jitted.lower
    self.trace = getattr(self._jitted, "trace", None)

  def __call__(self, state, *args, **kwargs):
    computed, aux, plan = self._jitted(state, *args, **kwargs)
    return merge_computed(state, computed, plan), aux


def forwarding_jit(fun: Callable | None = None, **jit_kwargs):
  """Decorator: `ForwardingJit(fun, **jit_kwargs)` (`jit_kwargs` as `jax.jit`'s)."""
  if fun is None:
    return functools.partial(forwarding_jit, **jit_kwargs)
  return ForwardingJit(fun, **jit_kwargs)

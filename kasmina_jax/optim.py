"""optax integration: children learn only where their seed's stage says so.

docs/design.md's "Stage table" fixes which children learn: TRAINING, GRAFTING and FINE_TUNING
(`lifecycle.LEARNING_STAGES`). Everywhere else a child is frozen: it must get exactly zero
updates, and the optimizer's state for it (Adam moments, momentum, ...) must not drift while
it waits, so that a child that learns again (GRAFTING after TRAINING, FINE_TUNING after
EVALUATING) resumes from the moments it left. When a child is (re)germinated or discarded its
optimizer state is reset. Isolation holds at the update too: clipping and norms are computed
per partition (the host; each seed's child), so a child's gradient never changes the host's
update.

How children are found: by structure, not by name. A node of the parameter tree is one
layer's children (every leaf with leading axis `num_seeds`) when it is a `blueprints.ChildParams`
(matched by `isinstance`, flattening with `is_leaf`; the Linen layers' `params`) or a mapping
whose keys are exactly `ChildParams`' field names (what `nnx.state` / `nnx.as_pure` make of the
NNX layers' per-field `nnx.Param`s). The *layer path* of such a node is its path with the last
key dropped (both layers store their children under the key "children"), which is the path
`linen.find_layers` and `kasmina_jax.nnx.find_layers` give for the layer's seed state.

Seed states come in as a mapping `{layer path: SeedState}` (`linen.seed_states(collection)`,
`kasmina_jax.nnx.seed_states(model)`): this module knows pytrees and `SeedState` only, not
Flax (docs/design.md, "Layering").

Everything here is pure and jittable; the tree walks are static (they only read structure).

Typical use (Linen):

    tx = optim.kasmina_optimizer(optax.adam(1e-3), max_grad_norm=1.0)
    opt_state = tx.init(params)
    ...
    mask = optim.learning_mask(params, linen.seed_states(variables["kasmina"]))
    updates, opt_state = tx.update(grads, opt_state, params, learn_mask=mask)
    ...
    # epoch end, after lifecycle.apply_commands and layer.reinit_children:
    opt_state = optim.reset_children(opt_state, params, optim.reset_mask(
        params, linen.seed_states(kasmina_old), linen.seed_states(kasmina_new)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kasmina_jax import _checks
from kasmina_jax import layer as layer_lib
from kasmina_jax import lifecycle
from kasmina_jax.blueprints import ChildParams
from kasmina_jax.sequence import SequenceChildParams

# The children records of the two layer families (chunk children, sequence children).
CHILD_TYPES = (ChildParams, SequenceChildParams)
# A layer's children in a tree: one of `CHILD_TYPES`, or a mapping with exactly one's fields
# (what `nnx.state` makes of the NNX layer's per-field `nnx.Param`s).
_CHILD_FIELDS = {frozenset(f.name for f in dataclasses.fields(t)): t for t in CHILD_TYPES}


def child_type_of_fields(keys) -> type | None:
  """The children record whose fields are exactly `keys` (None if none is)."""
  return _CHILD_FIELDS.get(frozenset(keys))


def _is_child(x) -> bool:
  return isinstance(x, CHILD_TYPES) or (isinstance(x, Mapping)
                                        and child_type_of_fields(x.keys()) is not None)


def _key_name(entry) -> Any:
  """A tree path entry as a plain key (dict key, attribute name or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _plain_path(path) -> tuple:
  return tuple(_key_name(p) for p in path)


def layer_path(children_path: tuple) -> tuple:
  """The layer path of a `ChildParams` at `children_path` (its last key dropped)."""
  return tuple(children_path[:-1])


def find_children(params: Any) -> dict[tuple, Any]:
  """`{layer path: children}` for every Kasmina layer's children in `params`."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_child)[0]:
    if _is_child(leaf):
      found[layer_path(_plain_path(path))] = leaf
  return found


def _seeds_of(v) -> lifecycle.SeedState | None:
  """The `SeedState` of a map value: itself, or a layer record's `.seeds` (the Linen shell's
  `KasminaVars`, read by duck typing so that this module needs no Flax)."""
  if isinstance(v, lifecycle.SeedState):
    return v
  seeds = getattr(v, "seeds", None)
  return seeds if isinstance(seeds, lifecycle.SeedState) else None


def _seeds_by_layer(kasmina: Any, name: str) -> dict[tuple, lifecycle.SeedState]:
  """`{layer path: SeedState}` from a mapping `{layer path: SeedState}` (what
  `linen.seed_states` and `kasmina_jax.nnx.seed_states` build).

  A nested collection (a Linen `kasmina` collection, as older callers pass) is walked for its
  layer records (nodes with a `SeedState` `.seeds`; the layer path drops the trailing
  "state" key), so it still works without this module importing the Linen shell.
  """
  if isinstance(kasmina, Mapping) and all(isinstance(k, tuple) for k in kasmina):
    out = {}
    for k, v in kasmina.items():
      seeds = _seeds_of(v)
      if seeds is None:
        raise TypeError(f"{name}: expected SeedState values (a {{layer path: SeedState}} "
                        f"map), got {type(v).__name__} at {k}")
      out[k] = seeds
    return out
  is_layer = lambda x: _seeds_of(x) is not None
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(kasmina, is_leaf=is_layer)[0]:
    if is_layer(leaf):
      found[_plain_path(path)[:-1]] = _seeds_of(leaf)
  return found


def _per_seed_mask(seed_mask: jax.Array, child: ChildParams, path: tuple) -> ChildParams:
  k = jax.tree.leaves(child)[0].shape[0]
  if jnp.shape(seed_mask) != (k,):
    raise ValueError(f"seed state of layer {path}: expected {k} seeds (the children's leading "
                     f"axis), got stage shape {jnp.shape(seed_mask)}")
  return jax.tree.map(lambda p: seed_mask.reshape((k,) + (1,) * (p.ndim - 1)), child)


def _mask_tree(params: Any, seeds: dict[tuple, Any], name: str,
               child_mask: Callable[[Any], jax.Array], host_value: bool,
               frozen_layers: Collection[tuple] = ()) -> Any:
  frozen_layers = {tuple(p) for p in frozen_layers}

  def leaf(path, x):
    if _is_child(x):
      lp = layer_path(_plain_path(path))
      if lp not in seeds:
        raise ValueError(f"{name}: no seed state for the layer at {lp} (children found in "
                         f"params); layers with seed state: {sorted(seeds, key=str)}")
      if lp in frozen_layers:
        return jax.tree.map(lambda _: np.asarray(False), x)
      return _per_seed_mask(child_mask(seeds[lp]), x, lp)
    # A concrete (numpy) flag, not a traced constant: `stage_masked` skips a constant True
    # mask outright, so the host's update carries no select (see `_always`).
    return np.asarray(host_value)

  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_child)


def learning_mask(params: Any, kasmina: Any, *, fossil: str = "integrated",
                  frozen_layers: Collection[tuple] = ()) -> Any:
  """Which parameters may learn this step: a tree of `params`' structure.

  Host leaves: `True` (a scalar bool array). `ChildParams` leaves: bool arrays shaped
  `(K, 1, ..., 1)` (broadcastable to the leaf): the seed's stage is in
  `lifecycle.learning_stages(fossil)` (TRAINING, GRAFTING, FINE_TUNING, and FOSSILIZED unless
  `fossil="frozen"`) and its child has not gone non-finite (`seeds.nonfinite`).

  `kasmina`: a mapping `{layer path: SeedState}` (`linen.seed_states(collection)`; a Linen
  collection itself is still read).

  `frozen_layers`: paths of layers known at trace time to have no live seed (their static
  `live` is False; learning stages are live ones): their children's mask is a concrete False,
  so `stage_masked` leaves those leaves and their optimizer state untouched with no op at all.
  """
  stages = lifecycle.learning_stages(fossil)
  seeds = _seeds_by_layer(kasmina, "kasmina")
  return _mask_tree(params, seeds, "learning_mask",
                    lambda s: lifecycle.stage_in(s.stage, stages) & ~s.nonfinite, True,
                    frozen_layers=frozen_layers)


def host_partition_mask(params: Any, kasmina: Any, *, fossil: str = "integrated") -> Any:
  """Which parameters are clipped with the host: a tree of `params`' structure.

  Host leaves: `True`. `ChildParams` leaves: `(K, 1, ..., 1)` bool, set for the seeds whose
  child is an integrated fossil (FOSSILIZED with `fossil="integrated"`): such a child is host
  capacity now, so its gradient shares the host's clipping norm. Every other child is its own
  partition. Pass it to the optimizer as `host_partition=` (see `clip_by_partition_norm`).
  """
  if fossil not in lifecycle.FOSSIL_MODES:
    raise ValueError(f"fossil: expected one of {lifecycle.FOSSIL_MODES}, got {fossil!r}")
  seeds = _seeds_by_layer(kasmina, "kasmina")
  integrated = fossil == "integrated"
  return _mask_tree(params, seeds, "host_partition_mask",
                    lambda s: (s.stage == lifecycle.Stage.FOSSILIZED) & integrated, True)


def reset_mask(params: Any, kasmina_old: Any, kasmina_new: Any) -> Any:
  """Whose optimizer state to reset after the epoch's commands: a tree of `params`' structure.

  `True` where a child was (re)initialised or discarded (`layer.changed_children` of the old
  and new stage); host leaves `False`.
  """
  old = _seeds_by_layer(kasmina_old, "kasmina_old")
  new = _seeds_by_layer(kasmina_new, "kasmina_new")
  if set(old) != set(new):
    raise ValueError(f"kasmina_new: layers {sorted(new, key=str)} differ from kasmina_old's "
                     f"{sorted(old, key=str)}")
  changed = {p: layer_lib.changed_children(old[p].stage, new[p].stage) for p in old}
  return _mask_tree(params, changed, "reset_mask", lambda c: c, False)


# ------------------------------------------------------------------------ state alignment


def _aligned(mask: jax.Array, leaf: jax.Array) -> jax.Array | None:
  """`mask` (() or (K, 1, ..., 1)) shaped to broadcast against `leaf`, or None when `leaf`
  has no seed axis to align with (e.g. factored second moments)."""
  mask = jnp.asarray(mask)
  if mask.ndim == 0:
    return mask
  k = mask.shape[0]
  shape = jnp.shape(leaf)
  if len(shape) >= 1 and shape[0] == k:
    return mask.reshape((k,) + (1,) * (len(shape) - 1))
  return None


def _map_params_shaped(fn: Callable[[Any], Any], tree: Any, treedef) -> Any:
  """Applies `fn` to every subtree of `tree` whose structure equals `treedef` (the params'),
  e.g. Adam's `mu` and `nu`; everything else (counts, hyperparameters) is left alone."""
  if jax.tree.structure(tree) == treedef:
    return fn(tree)
  children, inner = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(inner):
    return tree
  return jax.tree.unflatten(inner, [_map_params_shaped(fn, c, treedef) for c in children])


def _select_state(mask: Any, new_state: Any, old_state: Any, treedef) -> Any:
  """Leaf-aligned state: `where(mask, new, old)` per seed; other state: `new`."""
  if jax.tree.structure(new_state) != jax.tree.structure(old_state):
    raise ValueError("stage_masked: the inner optimizer changed its state's structure")

  def select(new_sub, old_sub):
    def leaf(m, n, o):
      if _always(m):
        return n
      if _never(m):
        return o
      a = _aligned(m, n)
      return n if a is None else jnp.where(a, n, o)
    return jax.tree.map(leaf, mask, new_sub, old_sub)

  def walk(new, old):
    if jax.tree.structure(new) == treedef:
      return select(new, old)
    children, inner = jax.tree_util.tree_flatten(new, is_leaf=lambda x: x is not new)
    if jax.tree_util.treedef_is_leaf(inner):
      return new
    old_children = inner.flatten_up_to(old)
    return jax.tree.unflatten(inner, [walk(n, o) for n, o in zip(children, old_children)])

  return walk(new_state, old_state)


# ------------------------------------------------------------------------ transformations


def _always(m) -> bool:
  """`m` is a concrete scalar True (a host leaf's mask): nothing to mask, no op needed."""
  return (isinstance(m, (bool, np.bool_, np.ndarray)) and np.ndim(m) == 0 and bool(m))


def _never(m) -> bool:
  """`m` is a concrete scalar False (a statically frozen leaf): no update, state kept as is."""
  return (isinstance(m, (bool, np.bool_, np.ndarray)) and np.ndim(m) == 0 and not bool(m))


def keep_frozen(mask: Any, new: Any, old: Any) -> Any:
  """`new` with `old`'s very leaves where `mask` (a `learning_mask`) is a concrete False:
  after `optax.apply_updates` (which adds the frozen leaves' zero update), the frozen leaves
  are the caller's arrays again, so a jitted step forwards them instead of copying them."""
  return jax.tree.map(lambda m, n, o: o if _never(m) else n, mask, new, old)


class StageMaskedState(NamedTuple):
  inner_state: Any


def _seed_finite(child: ChildParams) -> jax.Array:
  """(K,) bool: every gradient entry of the seed's child is finite."""
  leaves = jax.tree.leaves(child)
  k = leaves[0].shape[0]
  ok = jnp.ones((k,), bool)
  for g in leaves:
    ok = ok & jnp.all(jnp.isfinite(g.reshape((k, -1))), axis=1)
  return ok


def _effective_mask(updates: Any, learn_mask: Any) -> Any:
  """`learn_mask` with the seeds whose child gradient is non-finite this step turned off."""

  def per_node(g, m):
    if _is_child(g) and all(_never(x) for x in jax.tree.leaves(m)):
      return m  # statically frozen: no finiteness check, nothing to mask
    if _is_child(g):
      ok = _seed_finite(g)
      if not _is_child(m):  # one flag (scalar or (K,)) for all of the layer's children
        flag = m
        m = jax.tree.map(
            lambda gg: jnp.reshape(flag, jnp.shape(flag) + (1,) * (gg.ndim - jnp.ndim(flag))), g)
      return jax.tree.map(
          lambda mm, gg: jnp.asarray(mm, bool) & ok.reshape((-1,) + (1,) * (gg.ndim - 1)), m, g)
    return m if (_always(m) or _never(m)) else jnp.asarray(m, bool)

  try:
    return jax.tree.map(per_node, updates, learn_mask, is_leaf=_is_child)
  except ValueError as e:
    raise ValueError("learn_mask: expected a tree of the gradients' structure "
                     f"(optim.learning_mask(params, kasmina)); {e}") from None


def stage_masked(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Wraps any optax optimizer so that only learning children (and the host) move.

  `update(updates, state, params=None, *, learn_mask, **extra)`, `learn_mask` from
  `learning_mask`: frozen children get exactly zero updates, and every leaf-aligned part of the
  inner optimizer's state (any subtree shaped like the params: moments, momentum traces,
  accumulators) keeps its old value for them (`where(mask, new, old)` per seed), so nothing
  drifts while a child is frozen. A child whose gradient holds a non-finite entry is treated as
  frozen for that step (its gradient is zeroed before the inner update; the layer's non-finite
  guard already zeroes it, this is the second line). Shared state (step counts, injected
  hyperparameters) advances as the inner optimizer says.

  Note: bias-corrected optimizers (Adam) keep one shared step count, so a child reset by
  `reset_children` late in training takes its first steps with little bias correction.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return StageMaskedState(inner_state=inner.init(params))

  def update_fn(updates, state, params=None, *, learn_mask=None, host_partition=None, **extra):
    del host_partition  # the clipping's argument (`clip_by_partition_norm`), not the inner's
    if learn_mask is None:
      raise TypeError("stage_masked: update needs learn_mask= (optim.learning_mask(params, "
                      "kasmina)); got none")
    mask = _effective_mask(updates, learn_mask)
    def zero_frozen(m, g):
      if _always(m):
        return g
      return jnp.zeros_like(g) if _never(m) else jnp.where(m, g, jnp.zeros_like(g))
    grads = jax.tree.map(zero_frozen, mask, updates)
    new_updates, new_inner = inner.update(grads, state.inner_state, params, **extra)
    new_updates = jax.tree.map(zero_frozen, mask, new_updates)
    new_inner = _select_state(mask, new_inner, state.inner_state, jax.tree.structure(updates))
    return new_updates, StageMaskedState(inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reset_children(opt_state: Any, params: Any, reset_mask: Any) -> Any:
  """Zeroes the optimizer state of the children in `reset_mask` (from `reset_mask`).

  Works on any optax state: every subtree whose structure equals `params`' (moments,
  momentum, accumulators) is zeroed per seed where the mask is set; host state, step counts
  and hyperparameters are left alone.
  """
  treedef = jax.tree.structure(params)
  if jax.tree.structure(reset_mask) != treedef:
    raise ValueError("reset_mask: expected a tree of params' structure "
                     "(optim.reset_mask(params, kasmina_old, kasmina_new))")

  def zero(sub):
    def leaf(m, s):
      a = _aligned(m, s)
      return s if a is None else jnp.where(a, jnp.zeros_like(s), s)
    return jax.tree.map(leaf, reset_mask, sub)

  return _map_params_shaped(zero, opt_state, treedef)


# ------------------------------------------------------------------------ per-partition norms


def _sq_sum(x: jax.Array, axes=None) -> jax.Array:
  """Sum of squares, accumulated in at least float32 (bf16 gradients included)."""
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sum(jnp.square(x), axis=axes)


def _child_norm(child: ChildParams) -> jax.Array:
  leaves = jax.tree.leaves(child)
  k = leaves[0].shape[0]
  total = jnp.zeros((k,), jnp.float32)
  for g in leaves:
    total = total + _sq_sum(g.reshape((k, -1)), axes=1).astype(jnp.float32)
  return jnp.sqrt(total)


def partition_norms(grads: Any, host_partition: Any = None
                    ) -> tuple[jax.Array, dict[tuple, jax.Array]]:
  """`(host_norm, child_norms)`: the global L2 norm of the host partition, and per layer
  (keyed by layer path, as `linen.find_layers`) the `(K,)` L2 norm of each seed's child.

  The host partition is every non-child leaf, plus, with `host_partition` (from
  `host_partition_mask`), the children it marks (integrated fossils)."""
  host_sq = jnp.zeros((), jnp.float32)
  children = {}
  flat = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_child)[0]
  masks = (None,) * len(flat) if host_partition is None else _flat_masks(
      grads, host_partition, "host_partition")
  for (path, leaf), mask in zip(flat, masks):
    if _is_child(leaf):
      norms = _child_norm(leaf)
      children[layer_path(_plain_path(path))] = norms
      if mask is not None:
        in_host = jnp.reshape(jax.tree.leaves(mask)[0], (-1,))
        host_sq = host_sq + jnp.sum(jnp.where(in_host, jnp.square(norms), 0.0))
    else:
      host_sq = host_sq + _sq_sum(leaf).astype(jnp.float32)
  return jnp.sqrt(host_sq), children


def _flat_masks(tree: Any, mask_tree: Any, name: str) -> list:
  """`mask_tree`'s nodes aligned with `tree`'s (children as one node each)."""
  treedef = jax.tree.structure(tree, is_leaf=_is_child)
  try:
    return treedef.flatten_up_to(mask_tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name}: expected a tree of the gradients' structure "
                     f"(optim.host_partition_mask(params, kasmina)); {e}") from None


def _clip(t: jax.Array, norm: jax.Array, max_norm: float) -> jax.Array:
  # optax.clip_by_global_norm's formula; a non-finite norm leaves its partition untouched
  # (stage_masked then drops a non-finite child).
  trigger = (norm < max_norm) | ~jnp.isfinite(norm)
  return jnp.where(trigger, t, (t / norm.astype(t.dtype)) * max_norm)


def clip_by_partition_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` with the norm taken per partition: the host (every non-child
  leaf) is clipped by its own global norm and each seed's child by its own norm, so a child's
  gradient never changes the host's update (and vice versa).

  `update(..., host_partition=mask)` (from `host_partition_mask`) moves the marked children
  (integrated fossils) into the host partition: they join the host's norm and are clipped by
  it. Without it every child is its own partition."""
  max_norm = _checks.finite_float("max_norm", max_norm, min_value=0.0)
  if max_norm <= 0:
    raise ValueError(f"max_norm: expected > 0, got {max_norm!r}")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, host_partition=None, **extra):
    del params, extra
    host_norm, _ = partition_norms(updates, host_partition)
    masks = ((None,) * len(jax.tree.leaves(updates, is_leaf=_is_child))
             if host_partition is None else _flat_masks(updates, host_partition,
                                                       "host_partition"))
    treedef = jax.tree.structure(updates, is_leaf=_is_child)

    def node(x, mask):
      if _is_child(x):
        norms = _child_norm(x)
        if mask is not None:
          in_host = jnp.reshape(jax.tree.leaves(mask)[0], (-1,))
          norms = jnp.where(in_host, host_norm, norms)
        return jax.tree.map(
            lambda g: _clip(g, norms.reshape((-1,) + (1,) * (g.ndim - 1)), max_norm), x)
      return _clip(x, host_norm, max_norm)

    nodes = treedef.flatten_up_to(updates)
    return jax.tree.unflatten(treedef, [node(x, m) for x, m in zip(nodes, masks)]), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kasmina_optimizer(inner: optax.GradientTransformation, *,
                      max_grad_norm: float | None = None) -> optax.GradientTransformationExtraArgs:
  """`[clip_by_partition_norm(max_grad_norm)] + stage_masked(inner)`; `update` needs
  `learn_mask=learning_mask(params, kasmina)` and takes
  `host_partition=host_partition_mask(params, kasmina)` (integrated fossils clip with the host)."""
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner: expected an optax.GradientTransformation, got {type(inner).__name__}")
  parts = []
  if max_grad_norm is not None:
    parts.append(clip_by_partition_norm(max_grad_norm))
  parts.append(stage_masked(inner))
  return optax.chain(*parts)

"""The chunked Kasmina layer: the pure-`jnp` reference forward.

`x` of shape `(..., D)` is split into `num_seeds` chunks along its last axis
(`numpy.array_split` sizes), each chunk is processed by its seed according to its stage, and
the chunks are concatenated back. The stage rules (docs/design.md, "Stage table"):

  stage                      value of the chunk      written as
  DORMANT/GERMINATED/...     x                       x
  TRAINING (residual/par.)   x                       x + (f(sg x) - sg f(sg x))    (STE)
  TRAINING (replacement)     x                       x
  GRAFTING                   (1-a) x + a g(x)        x + a (g(sg x) - sg x)
  STABILIZATION/EVALUATING   g(x)                    g(x), child frozen
  FINE_TUNING                g(x)                    g(x), child learns
  FOSSILIZED                 g(x)                    g(x), child learns (fossil="integrated")
                                                     or frozen (fossil="frozen")

A child whose output is non-finite on a step contributes identity for that step: its output
is masked by a `where` and its cotangents are zeroed in the backward, so no NaN reaches any
gradient, and `aux.nonfinite` reports it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import _checks
from kasmina_jax import blueprints as bp_lib
from kasmina_jax import kernels
from kasmina_jax import sequence as seq_lib
from kasmina_jax import telemetry as tel_lib
# The helpers the reference shares with the kernels live in `chunks` (below both modules);
# they stay importable from here.
from kasmina_jax.chunks import (  # pylint: disable=unused-import
    SeedTables,
    StepAux,
    canonical_precision,
    child_branch,
    from_blocks,
    parallel_first_layer,
    seed_tables,
    stage_masks,
    to_blocks,
)
from kasmina_jax.lifecycle import Stage

IMPLS = kernels.IMPLS  # the values of `forward`'s `impl` (defined with the backends)


@dataclasses.dataclass(frozen=True)
class KasminaSpec:
  """Static description of one Kasmina layer (hashable; pass it as a static argument).

  dim: width `D` of the activations; num_seeds: number of chunks (1..D, `D` = per-node mode);
  blueprints: the catalog of children; input_dim: width of the wrapped host layer's input
  (needed by parallel-wired blueprints); corr_rows: rows a step used for the correlation Gram
  matrix (0 disables it); dead_eps: |a| at or below which a node counts as inactive on a row;
  trust_penalty: lambda of the TRAINING objective of residual / parallel children;
  telemetry_every: each training pass measures the health telemetry on about one row in this
  many (a block of rows that moves along the batch, at least `telemetry.TELEMETRY_MIN_ROWS`;
  see `telemetry.rows_for_pass`); the fused kernels measure every row (it costs them nothing).
  """

  dim: int
  num_seeds: int
  blueprints: tuple[bp_lib.Blueprint, ...] = dataclasses.field(
      default_factory=bp_lib.default_blueprints)
  input_dim: int | None = None
  corr_rows: int = 256
  dead_eps: float = tel_lib.DEAD_EPS
  trust_penalty: float = 1.0
  telemetry_every: int = tel_lib.DEFAULT_TELEMETRY_EVERY

  def __post_init__(self):
    _checks.positive_int("dim", self.dim)
    _checks.positive_int("num_seeds", self.num_seeds)
    if self.num_seeds > self.dim:
      raise ValueError(f"num_seeds: must be <= dim ({self.dim}), got {self.num_seeds}")
    if self.input_dim is not None:
      _checks.positive_int("input_dim", self.input_dim)
    _checks.non_negative_int("corr_rows", self.corr_rows)
    _checks.finite_float("dead_eps", self.dead_eps, min_value=0.0)
    _checks.finite_float("trust_penalty", self.trust_penalty, min_value=0.0)
    _checks.positive_int("telemetry_every", self.telemetry_every)
    object.__setattr__(self, "blueprints", tuple(self.blueprints))
    self.catalog  # validates the blueprints

  # -- chunk geometry (all static) --
  @property
  def chunk_sizes(self) -> tuple[int, ...]:
    q, r = divmod(self.dim, self.num_seeds)
    return tuple([q + 1] * r + [q] * (self.num_seeds - r))

  @property
  def chunk_width(self) -> int:
    return -(-self.dim // self.num_seeds)

  @property
  def chunk_offsets(self) -> tuple[int, ...]:
    return tuple(int(o) for o in np.cumsum((0,) + self.chunk_sizes[:-1]))

  @property
  def node_mask(self) -> np.ndarray:
    """(K, c) bool: which padded node slots are real nodes."""
    c = self.chunk_width
    return np.arange(c)[None, :] < np.asarray(self.chunk_sizes)[:, None]

  @functools.cached_property
  def catalog(self) -> bp_lib.Catalog:
    return bp_lib.build_catalog(self.blueprints, self.chunk_width, self.input_dim)

  @property
  def num_blueprints(self) -> int:
    return len(self.blueprints)

  @property
  def correlation(self) -> bool:
    return self.corr_rows > 0

  def blueprint_id(self, name: str) -> int:
    try:
      return self.catalog.names.index(name)
    except ValueError:
      raise ValueError(f"blueprint: unknown name {name!r}; known: {self.catalog.names}") from None


@dataclasses.dataclass(frozen=True)
class SequenceSpec(KasminaSpec):
  """A Kasmina layer whose children keep the token axis (`sequence.SequenceBlueprint`:
  attention heads or whole blocks; see `kasmina_jax.sequence`). `x` is `(..., T, dim)`;
  `input_dim` is the width of `u`, the host attention's input, that head children read;
  `context`: the sequence length the per-token FLOPs are reported at (0: attention's context
  term left out). Telemetry, seeds, stages and every loop function are those of any layer;
  the forward runs under XLA whatever `impl` says."""

  context: int = 0

  def __post_init__(self):
    _checks.non_negative_int("context", self.context)
    if not seq_lib.is_sequence_catalog(self.blueprints):
      raise TypeError("blueprints: a SequenceSpec takes sequence.SequenceBlueprint children")
    super().__post_init__()

  @functools.cached_property
  def catalog(self) -> seq_lib.SequenceCatalog:
    return seq_lib.build_catalog(self.blueprints, self.dim, self.input_dim, self.context)


def make_spec(dim: int, num_seeds: int, blueprints=None, **kwargs) -> KasminaSpec:
  """The layer spec for `blueprints`: a `SequenceSpec` for sequence blueprints, otherwise a
  `KasminaSpec` (`context` is dropped for chunk blueprints, whose cost is per row)."""
  blueprints = bp_lib.default_blueprints() if blueprints is None else tuple(blueprints)
  if seq_lib.is_sequence_catalog(blueprints):
    return SequenceSpec(dim=dim, num_seeds=num_seeds, blueprints=blueprints, **kwargs)
  kwargs.pop("context", None)
  return KasminaSpec(dim=dim, num_seeds=num_seeds, blueprints=blueprints, **kwargs)


def is_sequence(spec) -> bool:
  return isinstance(spec, SequenceSpec)


def init_children(spec: KasminaSpec, dtype=jnp.float32):
  """Every seed's child parameters, zero (no seed holds a child yet): a
  `blueprints.ChildParams`, or a `sequence.SequenceChildParams` for a `SequenceSpec`."""
  if is_sequence(spec):
    return seq_lib.zeros_like_layout(spec.catalog, spec.num_seeds, dtype)
  return bp_lib.zeros_like_layout(spec.catalog, spec.num_seeds, dtype)


def init_telemetry(spec: KasminaSpec) -> tel_lib.TelemetryState:
  return tel_lib.init_telemetry(spec.num_seeds, spec.chunk_width, correlation=spec.correlation)


def germinate_children(spec: KasminaSpec, params: bp_lib.ChildParams, mask, blueprint,
                       key: jax.Array) -> bp_lib.ChildParams:
  """Fresh, function-preserving children for the seeds in `mask`; others unchanged."""
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), (spec.num_seeds,))
  blueprint = jnp.broadcast_to(jnp.asarray(blueprint, jnp.int32), (spec.num_seeds,))
  if is_sequence(spec):
    return seq_lib.germinate_children(spec.catalog, params, mask, blueprint, key)
  return bp_lib.germinate_children(spec.catalog, params, mask, blueprint, key,
                                   jnp.asarray(spec.node_mask))


def reinit_children(spec: KasminaSpec, params: bp_lib.ChildParams, old_stage: jax.Array,
                    new_seeds, key: jax.Array) -> bp_lib.ChildParams:
  """After `apply_commands`: germinated seeds get a fresh child, culled / cancelled /
  rolled-back / dormant ones a zero child (docs/design.md, "Who decides what")."""
  new_stage = new_seeds.stage
  changed = old_stage != new_stage
  germ = changed & (new_stage == Stage.GERMINATED)
  dead = changed & ((new_stage == Stage.CULLED) | (new_stage == Stage.CANCELLED)
                    | (new_stage == Stage.ROLLED_BACK) | (new_stage == Stage.DORMANT))
  params = bp_lib.zero_children(params, dead)
  return germinate_children(spec, params, germ, new_seeds.blueprint, key)


def changed_children(old_stage: jax.Array, new_stage: jax.Array) -> jax.Array:
  """(K,) bool: seeds whose child was (re)initialised or discarded (reset their optimizer)."""
  changed = old_stage != new_stage
  return changed & ((new_stage == Stage.GERMINATED) | (new_stage == Stage.CULLED)
                    | (new_stage == Stage.CANCELLED) | (new_stage == Stage.ROLLED_BACK)
                    | (new_stage == Stage.DORMANT))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _guarded_child(params, tables, xb, pre_u, precision):
  """`child_branch` with the non-finite guard: returns `(f, ok)`, `f` zero for bad seeds;
  the backward zeroes every cotangent of a bad seed, so NaN reaches no gradient."""
  f = child_branch(params, tables, xb, pre_u, precision)
  ok = jnp.all(jnp.isfinite(f), axis=(0, 2))
  return jnp.where(ok[None, :, None], f, 0.0), ok


def _gc_fwd(params, tables, xb, pre_u, precision):
  out = _guarded_child(params, tables, xb, pre_u, precision)
  return out, (params, tables, xb, pre_u, out[1])


def _gc_bwd(precision, res, cts):
  params, tables, xb, pre_u, ok = res
  ct_f, _ = cts
  ct_f = jnp.where(ok[None, :, None], ct_f, 0.0)
  _, vjp = jax.vjp(lambda p, x, pu: child_branch(p, tables, x, pu, precision), params, xb,
                   pre_u)
  dp, dx, dpu = vjp(ct_f)
  k_axis_zero = lambda g: jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
  dp = jax.tree.map(k_axis_zero, dp)
  dx = jnp.where(ok[None, :, None], dx, 0.0)
  dpu = None if pre_u is None else jnp.where(ok[None, :, None], dpu, 0.0)
  return dp, jax.tree.map(jnp.zeros_like, tables), dx, dpu


_guarded_child.defvjp(_gc_fwd, _gc_bwd)


def check_inputs(spec: KasminaSpec, params: bp_lib.ChildParams, seeds, x, u=None,
                 eval_alpha=None) -> None:
  """Shape and dtype checks, before tracing; errors name the bad argument."""
  if not isinstance(spec, KasminaSpec):
    raise TypeError(f"spec: expected a KasminaSpec, got {type(spec).__name__}")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"x: expected an array, got {type(x).__name__}")
  _checks.float_array("x", x, allowed=(jnp.float32, jnp.bfloat16, jnp.float16))
  if x.ndim < 1 or x.shape[-1] != spec.dim:
    raise ValueError(f"x: expected shape (..., {spec.dim}), got {tuple(x.shape)}")
  if jnp.shape(seeds.stage) != (spec.num_seeds,):
    raise ValueError(f"seeds.stage: expected shape ({spec.num_seeds},), got {jnp.shape(seeds.stage)}")
  expected = jax.eval_shape(lambda: init_children(spec))
  if type(params) is not type(expected):
    raise TypeError(f"params: expected {type(expected).__name__} for this spec, got "
                    f"{type(params).__name__}")
  for field in dataclasses.fields(expected):
    name = field.name
    got = jnp.shape(getattr(params, name))
    want = getattr(expected, name).shape
    if got != want:
      raise ValueError(f"params.{name}: expected shape {want} for this spec, got {got}")
  if is_sequence(spec):
    seq_lib.check_sequence_input(spec, x, u)
  elif spec.catalog.any_parallel:
    if u is None:
      raise ValueError("u: this layer has parallel-wired blueprints; pass the wrapped host "
                       "layer's input u")
    if u.shape[:-1] != x.shape[:-1] or u.shape[-1] != spec.input_dim:
      raise ValueError(f"u: expected shape {tuple(x.shape[:-1]) + (spec.input_dim,)}, got {tuple(u.shape)}")
  if eval_alpha is not None and jnp.shape(eval_alpha) not in ((), (spec.num_seeds,)):
    raise ValueError(f"eval_alpha: expected shape () or ({spec.num_seeds},), got {jnp.shape(eval_alpha)}")


def forward(spec: KasminaSpec, params: bp_lib.ChildParams, seeds, x: jax.Array, *,
            u: jax.Array | None = None, telemetry: tel_lib.TelemetryState | None = None,
            eval_alpha: jax.Array | None = None, impl: str = "auto", precision=None,
            live: bool | None = None, row_split: kernels.RowSplit | None = None):
  """The chunked layer. Returns `(out, aux)`; `out` has `x`'s shape and dtype.

  Training pass: pass `telemetry` (the epoch accumulators) and get it back updated in
  `aux.telemetry`; add `aux.child_loss` to the task loss (the TRAINING seeds' objective).
  Evaluation pass: pass `eval_alpha` (scalar or per seed; 0 = seed off, 1 = fully on, also
  for a seed still in TRAINING): every live seed blends `x + eval_alpha (g(x) - x)`, and no
  telemetry is taken.

  impl: "auto" (default: the fused Triton kernels where the device and layer shape make them
    the faster path, the reference elsewhere, CPU included; logged once), "reference",
    "pallas" or "triton" (see `kasmina_jax.kernels`).
  precision: of the child matmuls (float32 inside), as for `jnp.dot`: None (default) is
  JAX's default matmul precision (TF32 on NVIDIA GPUs since Ampere, as XLA uses for
  `jnp.dot`; exact float32 on CPU; `jax.default_matmul_precision` changes it); "highest" /
  `jax.lax.Precision.HIGHEST` is the exact path. Every `impl` honours it.
  live: what is known at trace time about the seeds' stages (`check_live`). None (default):
  nothing; whether any seed is live is decided on the device each pass (`lax.cond` in the
  reference; the kernels skip dormant seeds themselves). False: a promise that no seed is
  live (TRAINING .. FOSSILIZED); the child path is left out of the program: the output is
  `x`, the backward the identity, only the telemetry reads `x`. True: some seed may be
  live; the child path runs with no device-side branch (on a GPU, a `lax.cond` waits for
  its predicate on the host). The train step passes what `training.refresh_liveness` read
  from the stages at the last epoch boundary (stages change only there).
  row_split: a `kernels.RowSplit` when the rows of `x` are split over a mesh axis (data
  parallelism; None: the one of the enclosing `kernels.split_rows` block, if any). The fused
  kernels then run per device on its own rows (`shard_map`, per-seed sums added over the
  axis) instead of being gathered; the reference is partitioned by XLA and ignores it.
  """
  check_inputs(spec, params, seeds, x, u, eval_alpha)
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  check_live(live)
  kernels.sharded.check_row_split(row_split, "row_split")
  precision = canonical_precision(precision)
  if live is False:
    return _dormant_forward(spec, x, telemetry, eval_alpha)
  if is_sequence(spec):  # no fused kernel: XLA runs these children
    return forward_reference(spec, params, seeds, x, u=u, telemetry=telemetry,
                             eval_alpha=eval_alpha, precision=precision, live=live)
  if impl != "reference":
    resolved = kernels.resolve_impl(impl, spec, precision)
    if resolved != "reference":
      row_split = kernels.current_row_split() if row_split is None else row_split
      return kernels.forward(spec, params, seeds, x, u=u, telemetry=telemetry,
                             eval_alpha=eval_alpha, impl=resolved, precision=precision,
                             row_split=row_split)
  return forward_reference(spec, params, seeds, x, u=u, telemetry=telemetry,
                           eval_alpha=eval_alpha, precision=precision, live=live)


def check_live(live) -> None:
  """`live` is None, True or False (a static fact about a layer's stages, not an array)."""
  if live is not None and not isinstance(live, (bool, np.bool_)):
    raise TypeError(f"live: expected None, True or False (known at trace time), got "
                    f"{type(live).__name__} {live!r}")


def _measure_reference(spec: KasminaSpec, x2d: jax.Array, telemetry, live, ok):
  """The telemetry update of one training pass in pure `jnp` (on the layer's schedule)."""
  def measure(tel):
    rows = tel_lib.rows_for_pass(x2d, tel.passes, spec.telemetry_every)
    block = lambda r: jax.lax.stop_gradient(to_blocks(spec, r).astype(jnp.float32))
    xb = block(rows)
    tel = tel_lib.with_shift(tel, xb[0])
    # The Gram matrix on the pass's own first rows, whichever block the sums read.
    corr = None if rows is x2d else block(x2d[:max(spec.corr_rows, 1)])
    partials = tel_lib.partials_reference(xb, tel.shift, corr_rows=spec.corr_rows,
                                          correlation=spec.correlation,
                                          dead_eps=spec.dead_eps, corr_blocks=corr)
    return tel_lib.merge(tel, partials)
  new_tel = tel_lib.scheduled(telemetry, measure)
  if live is None:  # the dormant layer: no child, nothing to flag
    return new_tel
  return new_tel.replace(nonfinite=new_tel.nonfinite | (live & ~ok))


def _dormant_forward(spec: KasminaSpec, x: jax.Array, telemetry, eval_alpha):
  """The layer when no seed is live (known at trace time): `x` itself, no child."""
  lead = x.shape[:-1]
  x2d = x.reshape((int(np.prod(lead)) if lead else 1, spec.dim))
  k = spec.num_seeds
  nan = jnp.full((k,), jnp.nan, jnp.float32)
  none_live = jnp.zeros((k,), bool)
  new_tel = None
  if telemetry is not None and eval_alpha is None:
    new_tel = _measure_reference(spec, x2d, telemetry, None, None)
  aux = StepAux(child_loss=jnp.zeros((), jnp.float32), objective=nan, recon_ratio=nan,
                nonfinite=none_live, telemetry=new_tel)
  return x, aux


def _zero_cotangent(x):
  """The zero cotangent of a primal `x` (float0 for integer and bool arrays)."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _live_or_dormant(live_fn, dormant_fn, any_live, diff, const):
  """`live_fn(diff, const)` when `any_live`, else `dormant_fn(diff, const)` (`lax.cond`).

  Its own VJP keeps only the inputs as residuals and runs the backward of the chosen branch
  under a second `lax.cond`: differentiating a plain `lax.cond` would make the dormant branch
  write zeros for every residual of the live one (activation-sized buffers), so a dormant
  layer would still pay memory traffic. The live branch's backward recomputes its forward
  (the child was recomputed in the backward already, `_guarded_child`)."""
  return jax.lax.cond(any_live, live_fn, dormant_fn, diff, const)


def _lod_fwd(live_fn, dormant_fn, any_live, diff, const):
  return _live_or_dormant(live_fn, dormant_fn, any_live, diff, const), (any_live, diff, const)


def _lod_bwd(live_fn, dormant_fn, res, ct):
  any_live, diff, const = res

  # Only the output and the child loss carry gradient (the objective and the ratio are
  # stopped, `ok` is bool): pass those two cotangents and rebuild the rest inside the branch.
  ct_out, ct_loss = ct[0], ct[1]

  def full_ct(ct_out_, ct_loss_):
    return (ct_out_, ct_loss_, jnp.zeros_like(ct[2]), jnp.zeros_like(ct[3]),
            np.zeros(jnp.shape(ct[4]), dtype=jax.dtypes.float0))

  def branch(fn):
    def bwd(diff_, const_, ct_out_, ct_loss_):
      _, vjp = jax.vjp(lambda d: fn(d, const_), diff_)
      return vjp(full_ct(ct_out_, ct_loss_))[0]
    return bwd

  d_diff = jax.lax.cond(any_live, branch(live_fn), branch(dormant_fn), diff, const, ct_out,
                        ct_loss)
  return (_zero_cotangent(any_live), d_diff, jax.tree.map(_zero_cotangent, const))


_live_or_dormant.defvjp(_lod_fwd, _lod_bwd)


def forward_reference(spec: KasminaSpec, params: bp_lib.ChildParams, seeds, x: jax.Array, *,
                      u=None, telemetry=None, eval_alpha=None, precision=None,
                      live: bool | None = None):
  """Pure-`jnp` forward (see `forward`); the contract every kernel matches.

  While no seed of the layer is live (TRAINING .. FOSSILIZED) the child path does not run
  (`lax.cond`, or left out at trace time with `live=False`): the output is `x`, the backward
  the identity, and only the telemetry reads the activations. `live=True` runs the child
  path with no branch."""
  check_live(live)
  if live is False:
    return _dormant_forward(spec, x, telemetry, eval_alpha)
  if is_sequence(spec):
    return _sequence_forward(spec, params, seeds, x, u, telemetry, eval_alpha,
                             canonical_precision(precision), live)
  live_hint = live
  precision = canonical_precision(precision)
  lead = x.shape[:-1]
  rows = int(np.prod(lead)) if lead else 1
  x2d = x.reshape((rows, spec.dim))
  u2 = None
  if spec.catalog.any_parallel:
    u2 = u.reshape((rows, spec.input_dim))
  live = stage_masks(seeds.stage)[3]
  ea = None if eval_alpha is None else jnp.asarray(eval_alpha, jnp.float32)
  const = (seeds.stage, seeds.blueprint, seeds.alpha)
  live_fn = functools.partial(_child_path, spec, eval_alpha is not None, precision)
  dormant_fn = functools.partial(_dormant_path, spec)
  diff = (params, x2d, u2, ea)
  if live_hint is True:
    out2d, child_loss, aux_objective, aux_ratio, ok = live_fn(diff, const)
  else:
    out2d, child_loss, aux_objective, aux_ratio, ok = _live_or_dormant(
        live_fn, dormant_fn, jnp.any(live), diff, const)

  new_tel = None
  if telemetry is not None and eval_alpha is None:
    new_tel = _measure_reference(spec, x2d, telemetry, live, ok)

  aux = StepAux(child_loss=child_loss, objective=aux_objective, recon_ratio=aux_ratio,
                nonfinite=live & ~ok, telemetry=new_tel)
  return out2d.reshape(x.shape), aux


def _sequence_forward(spec: SequenceSpec, params, seeds, x, u, telemetry, eval_alpha,
                      precision, live):
  """`forward_reference` of a sequence layer (`kasmina_jax.sequence`): the same stage rules,
  telemetry and `live` contract, children that mix tokens causally."""
  k = spec.num_seeds
  nan = jnp.full((k,), jnp.nan, jnp.float32)
  live_mask = stage_masks(seeds.stage)[3]

  def children(x_, u_):
    return seq_lib.child_path(spec, params, seeds, x_, u_, eval_alpha, precision)

  def dormant(x_, u_):
    del u_
    return x_, jnp.zeros((), jnp.float32), nan, nan, jnp.ones((k,), bool)

  if live is True:
    out, child_loss, objective, ratio, ok = children(x, u)
  else:
    out, child_loss, objective, ratio, ok = jax.lax.cond(
        jnp.any(live_mask), children, dormant, x, u)
  new_tel = None
  if telemetry is not None and eval_alpha is None:
    lead = x.shape[:-1]
    x2d = x.reshape((int(np.prod(lead)), spec.dim))
    new_tel = _measure_reference(spec, x2d, telemetry, live_mask, ok)
  aux = StepAux(child_loss=child_loss, objective=objective, recon_ratio=ratio,
                nonfinite=live_mask & ~ok, telemetry=new_tel)
  return out, aux


def _dormant_path(spec: KasminaSpec, diff, const):
  """`_child_path` when no seed is live: the output is `x`, nothing else is measured."""
  del const
  x2d = diff[1]
  k = spec.num_seeds
  nan = jnp.full((k,), jnp.nan, jnp.float32)
  return x2d, jnp.zeros((), jnp.float32), nan, nan, jnp.ones((k,), bool)


def _child_path(spec: KasminaSpec, evaluating: bool, precision, diff, const):
  """The children's part of the forward: `(out2d, child_loss, objective, recon_ratio, ok)`.

  `diff = (params, x2d, u2, eval_alpha)` (differentiable: the evaluation blend weights carry
  a gradient, the counterfactual's derivative), `const = (stage, blueprint, alpha)`."""
  params, x2d, u2, eval_alpha = diff
  stage, blueprint, alpha_in = const
  catalog = spec.catalog
  rows = x2d.shape[0]
  xb = to_blocks(spec, x2d).astype(jnp.float32)  # (N, K, c)
  node_mask = jnp.asarray(spec.node_mask)
  tables = seed_tables(catalog, blueprint)
  training, grafting, full_on, live, learning = stage_masks(stage)

  # Child parameters learn only in learning stages; the host's gradient goes through the
  # child only once it is fully on (STABILIZATION on).
  host_grad = full_on & ~jnp.asarray(evaluating)
  params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  p_eff = jax.tree.map(
      lambda p: jnp.where(learning.reshape((-1,) + (1,) * (p.ndim - 1)), p,
                          jax.lax.stop_gradient(p)), params32)
  # A chunk-wired child reads only its chunk (W1), a parallel-wired one only `u` (W1u): the
  # other input weights take no part in its function and get no gradient.
  par = tables.parallel[:, None, None] > 0
  p_eff = p_eff.replace(w1=jnp.where(par, 0.0, p_eff.w1), w1u=jnp.where(par, p_eff.w1u, 0.0))
  x_child = jnp.where(host_grad[None, :, None], xb, jax.lax.stop_gradient(xb))
  pre_u = None
  if catalog.any_parallel:
    pre_u = parallel_first_layer(u2.astype(jnp.float32), p_eff.w1u,
                                 host_grad.astype(jnp.float32), live & (tables.parallel > 0),
                                 precision)
  f, ok = _guarded_child(p_eff, tables, x_child, pre_u, precision)
  ok = ok | ~live
  f = f * (node_mask[None] & live[None, :, None])
  is_res = tables.residual[None, :, None] > 0
  # g(x) - x, computed so that a residual child's is exactly f.
  delta_g = jnp.where(is_res, f, f - x_child)
  if evaluating:
    ea = jnp.broadcast_to(eval_alpha, (spec.num_seeds,))
    w = jnp.where(live & ok, ea, 0.0)[None, :, None]
    out = jnp.where(w > 0, xb + w * delta_g, xb)
  else:
    alpha = jax.lax.stop_gradient(alpha_in.astype(jnp.float32))
    full_val = jnp.where(is_res, xb + f, f)
    ste = jnp.where((training[None, :, None] & is_res), f - jax.lax.stop_gradient(f), 0.0)
    out = jnp.select(
        [(full_on & ok)[None, :, None], (grafting & ok)[None, :, None]],
        [full_val, xb + alpha[None, :, None] * delta_g],
        default=xb) + ste
  out = jnp.where(node_mask[None], out, 0.0)

  # The child's own objective (on stopped inputs: gradients only reach the child).
  f_obj = f if not evaluating else jax.lax.stop_gradient(f)
  x_sg = jax.lax.stop_gradient(xb)
  sq_x = jnp.sum(x_sg * x_sg, axis=(0, 2))
  recon_err = jnp.sum(jnp.where(is_res, f_obj, f_obj - x_sg) ** 2, axis=(0, 2))
  recon_ratio = recon_err / jnp.maximum(sq_x, 1e-30)
  res_seed = tables.residual > 0
  # Residual / parallel children: trust-region penalty lambda * mean_rows ||f||^2 (the linear
  # part <dL/dout, f> comes through the straight-through estimator; its value needs the output
  # gradient: `whole_objective` adds it where the gradient is known). Replacement children:
  # reconstruction mean_rows ||g(x) - x||^2.
  objective = jnp.where(res_seed, spec.trust_penalty * recon_err, recon_err) / rows
  child_loss = jnp.sum(jnp.where(training & ok, objective, 0.0))
  nan = jnp.full_like(objective, jnp.nan)
  aux_objective = jnp.where(live, jax.lax.stop_gradient(objective), nan)
  aux_ratio = jnp.where(live, jax.lax.stop_gradient(recon_ratio), nan)
  out2d = from_blocks(spec, out.astype(x2d.dtype))
  return out2d, child_loss, aux_objective, aux_ratio, ok


def _last_layer_moment(params: bp_lib.ChildParams, grads: bp_lib.ChildParams) -> jax.Array:
  """(K,) `sum(theta * dL/dtheta)` over each child's last layer `(w2, b2, s)`."""
  e = jnp.zeros(params.b2.shape[:1], jnp.float32)
  for name in ("w2", "b2", "s"):
    p = getattr(params, name).astype(jnp.float32)
    g = getattr(grads, name).astype(jnp.float32)
    e = e + jnp.sum((p * g).reshape(p.shape[0], -1), axis=-1)
  return e


def whole_objective(spec: KasminaSpec, params: bp_lib.ChildParams, grads: bp_lib.ChildParams,
                    seeds, objective: jax.Array, nonfinite: jax.Array) -> jax.Array:
  """(K,) the child's whole training objective this step, as grafting needs it.

  `objective` is the forward's `StepAux.objective` (the penalty `P = lambda mean_rows ||f||^2`
  of residual / parallel children, the reconstruction loss of replacement children),
  `nonfinite` its `StepAux.nonfinite`; `grads` the gradients of the training loss (task +
  `child_loss`) with respect to `params`, `seeds` the state the forward ran with.

  Residual / parallel children get the trust-region objective `<dL/dout, f> + P`
  (docs/design.md, "TRAINING objective"). The forward cannot report its linear part (it needs dL/dout),
  and the kernels need not: every child in the catalog is linear in its last layer
  `(w2, b2, s)` jointly (`f = a w2 + b2 + s * x`), so `E = sum(theta * dL/dtheta)` over
  those parameters is `<dL/df, f>` exactly (Euler's identity), whichever backend computed the
  gradient. `dL/df = b dL/dout + 2 (lambda / rows) f [TRAINING]`, `b` the weight of the
  output gradient in the child's (1 in TRAINING (the STE) and FINE_TUNING, alpha in
  GRAFTING), hence `<dL/dout, f>` = `E - 2P` (TRAINING), `E / alpha` (GRAFTING),
  `E` (FINE_TUNING). Where the output gradient does not reach the child (frozen stages,
  GRAFTING at alpha 0, a non-finite child) it is not measured: NaN, which
  `grafting.update_objective` skips. Replacement children keep their reconstruction loss.
  """
  if is_sequence(spec):
    e = seq_lib.whole_objective(params, grads)
    res = jnp.ones(seeds.stage.shape, bool)
  else:
    e = _last_layer_moment(params, grads)
    res = seed_tables(spec.catalog, seeds.blueprint).residual > 0
  st = seeds.stage
  alpha = seeds.alpha.astype(jnp.float32)
  grafting = (st == Stage.GRAFTING) & (alpha > 0)
  lin = jnp.select(
      [st == Stage.TRAINING, grafting, st == Stage.FINE_TUNING],
      [e - 2.0 * objective, e / jnp.where(grafting, alpha, 1.0), e], default=jnp.nan)
  lin = jnp.where(nonfinite, jnp.nan, lin)
  return jnp.where(res, lin + objective, objective)


def health_report(spec: KasminaSpec, telemetry: tel_lib.TelemetryState, seeds,
                  aux_objective: jax.Array | None = None,
                  aux_recon_ratio: jax.Array | None = None) -> tel_lib.HealthReport:
  """End-of-epoch `HealthReport` of one layer from its accumulators and seed state."""
  var, dead, corr = tel_lib.node_statistics(telemetry, jnp.asarray(spec.node_mask))
  from kasmina_jax.lifecycle import ACTIVE_STAGES, stage_in  # pylint: disable=g-import-not-at-top
  active = stage_in(seeds.stage, ACTIVE_STAGES)
  b = jnp.clip(seeds.blueprint, 0, spec.num_blueprints - 1)
  cat = spec.catalog
  pc = jnp.where(active, jnp.asarray(cat.param_count)[b], 0)
  n = jnp.maximum(telemetry.grad_steps, 1.0)
  gm = telemetry.grad_norm_sum / n
  gvar = jnp.maximum(telemetry.grad_norm_sumsq / n - gm * gm, 0.0)
  nan = jnp.full((spec.num_seeds,), jnp.nan, jnp.float32)
  objective = seeds.objective if aux_objective is None else aux_objective
  recon = seeds.recon_ratio if aux_recon_ratio is None else aux_recon_ratio
  return tel_lib.HealthReport(
      chunk_variance=var, dead_node_ratio=dead, avg_inter_node_correlation=corr,
      alpha=jnp.where(active, seeds.alpha, 0.0),
      objective=jnp.where(active, objective, nan),
      recon_ratio=jnp.where(active, recon, nan),
      gradient_variance=jnp.where(active, gvar, 0.0),
      param_count=pc.astype(jnp.int32), param_bytes=(pc * 4).astype(jnp.int32),
      flops_per_row=jnp.where(active, jnp.asarray(cat.flops_per_row)[b], 0).astype(jnp.int32),
      nonfinite=telemetry.nonfinite | seeds.nonfinite)

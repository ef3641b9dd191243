"""Data-parallel training over a device mesh, with JAX's own distribution (`jax.sharding`).

The batch is sharded along one mesh axis (`"data"`); everything in the `TrainState` (params,
optimizer state, seed states, telemetry accumulators, controller state) is replicated. The
step and epoch functions are `training.train_step` / `training.epoch_transition` themselves,
compiled with `jax.jit` under those shardings (GSPMD):

- The program is the single-device program; only its placement changes. Every sum over rows
  (the loss mean, the gradients, the telemetry accumulators `count`/`sum`/`sumsq`/`dead`/
  `gram`) is a sum over the *global* batch, which XLA splits into per-device partial sums and
  an all-reduce. So every device holds the same telemetry and the same health report, up to
  the order of floating-point additions.
- Row-indexed choices are global too: the correlation subsample is the first `corr_rows` rows
  of the step's global batch and the telemetry shift is its first row, exactly as on one
  device (XLA moves those rows where they are needed).
- Tamiyo (`policy`) runs inside the jitted epoch transition on the replicated report, so its
  commands are replicated values: every device takes the same decision by construction, and
  there is no per-device Python logic that could diverge or wait on another device. The
  Python shell (`end_of_epoch`'s rollback test) reads one replicated scalar, the same on every
  host.

Usage on one host with several GPUs::

    from kasmina_jax import distributed
    state, history = distributed.fit(state, train, val, training.cross_entropy_loss,
                                     epochs=30, batch_size=1024)  # every visible device

or step by step::

    state, dp = distributed.data_parallel(state)  # mesh over jax.devices(), axis "data"
    state, metrics = dp.train_step(state, batch, loss_fn)   # batch: global rows (numpy ok)
    state, out, rolled_back = dp.end_of_epoch(state, val_batch, loss_fn)

Model parallelism over seeds (optional): on a two-axis mesh (`data_seed_mesh`), pass
`seed_axis="seeds"` to `data_parallel` / `fit`; each layer's child parameters, their
optimizer moments and the per-seed telemetry are then split along the seed axis (each device
owns a block of seeds), while the host layers and seed states stay replicated. It is the same
program under other shardings (GSPMD), tested to give the single-device decisions; it pays
off only for layers whose children are large next to their host.

Kernels: the `impl="pallas"` / `"triton"` layer paths lower to custom calls that XLA's
partitioner cannot split; so the step and the transition pass `kernels.RowSplit(mesh,
axis)` (when the data axis has more than one device) and the layers run their fused
primitive under `shard_map` over the data axis, each device on its own rows, the per-seed
sums added with `psum` (`kernels.common.fused_per_device`; tested on forced CPU devices:
the compiled step holds no all-gather). The `jnp` reference layer (the default) is
partitioned by XLA like any other computation.

Several hosts (documented, not tested here): call `jax.distributed.initialize()` (arguments
or the cluster's environment) in every process before any other JAX call, build the same
program in every process, and pass each process's *own* rows (`process_local=True` in
`shard_batch`; `fit` does this itself, each process taking its block of every global batch
so that the data order is that of one device). The global batch size must be divisible by
the number of devices on the data axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kasmina_jax import _checks
from kasmina_jax import _forwarding
from kasmina_jax import kernels
from kasmina_jax import linen as knn
from kasmina_jax import tamiyo
from kasmina_jax import training
from kasmina_jax import optim

DATA_AXIS = "data"
SEED_AXIS = "seeds"


# ------------------------------------------------------------------------------ placement


def data_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
  """A one-axis mesh over `devices` (default: every device, `jax.devices()`)."""
  if not isinstance(axis, str) or not axis:
    raise TypeError(f"axis: expected a non-empty str, got {axis!r}")
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices: expected at least one device, got none")
  return Mesh(np.array(devices, dtype=object), (axis,))


def data_seed_mesh(seed_ways: int, devices=None, axis: str = DATA_AXIS,
                   seed_axis: str = SEED_AXIS) -> Mesh:
  """A two-axis mesh: `len(devices) // seed_ways` ways of data by `seed_ways` ways of seeds
  (devices along the seed axis are neighbours in `devices`' order)."""
  _checks.positive_int("seed_ways", seed_ways)
  devices = list(jax.devices() if devices is None else devices)
  if not devices or len(devices) % seed_ways:
    raise ValueError(f"seed_ways: {seed_ways} does not divide the {len(devices)} devices")
  if axis == seed_axis:
    raise ValueError(f"seed_axis: must differ from axis {axis!r}")
  grid = np.array(devices, dtype=object).reshape(len(devices) // seed_ways, seed_ways)
  return Mesh(grid, (axis, seed_axis))


def _check_mesh(mesh: Mesh, axis: str, name: str = "axis") -> None:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis not in mesh.axis_names:
    raise ValueError(f"{name}: {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
  """The leading (row) axis split along `axis`; other mesh axes hold copies."""
  return NamedSharding(mesh, PartitionSpec(axis))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` (e.g. a `TrainState`) placed on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict, mesh: Mesh, axis: str = DATA_AXIS, *,
                process_local: bool = False) -> dict:
  """Places a batch with its rows split along `axis`.

  `batch` holds the global rows (numpy or JAX arrays), or with `process_local=True` (several
  hosts) only this process's rows, in process order; the global row count must be divisible
  by the size of `axis`.
  """
  _check_mesh(mesh, axis)
  if not isinstance(batch, dict) or not batch:
    raise TypeError(f"batch: expected a non-empty dict of arrays, got {type(batch).__name__}")
  sharding = batch_sharding(mesh, axis)
  ways = mesh.shape[axis]
  scale = jax.process_count() if process_local else 1
  rows = None
  for key, value in batch.items():
    shape = np.shape(value)
    if not shape:
      raise ValueError(f"batch[{key!r}]: expected an array with a row axis, got a scalar")
    if rows is None:
      rows = shape[0]
    if shape[0] != rows:
      raise ValueError(f"batch[{key!r}]: has {shape[0]} rows, expected {rows} like the others")
  if (rows * scale) % ways:
    raise ValueError(f"batch: {rows * scale} global rows are not divisible by the {ways} "
                     f"devices of mesh axis {axis!r}")
  if process_local:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
  # Arrays already split this way are passed as they are: `device_put` of a placed array
  # costs ~0.2 ms of host time a step for nothing (the data-parallel step calls this on every
  # batch, and a training loop usually passes batches placed ahead).
  todo = {k: v for k, v in batch.items()
          if not (isinstance(v, jax.Array) and v.sharding == sharding)}
  if not todo:
    return batch
  return {**batch, **jax.device_put(todo, sharding)}


def state_shardings(state: Any, mesh: Mesh, seed_axis: str | None = None) -> Any:
  """The sharding of every array leaf of `state` (a `TrainState` or any part of it).

  Without `seed_axis`: every leaf replicated. With it (model parallelism over seeds): every
  seed's child parameters (and their optimizer moments and drift snapshot) and the layers'
  per-seed telemetry accumulators are split along the leading seed axis over `seed_axis`,
  so each device along it owns a block of seeds; a layer whose seed count does not divide
  stays replicated. Seed states and everything else stay replicated (Tamiyo reads them).
  """
  rep = replicated(mesh)
  if seed_axis is None:
    return jax.tree.map(lambda _: rep, state)
  _check_mesh(mesh, seed_axis, "seed_axis")
  ways = mesh.shape[seed_axis]
  split = NamedSharding(mesh, PartitionSpec(seed_axis))

  def by_seed(x):
    return split if (np.ndim(x) >= 1 and np.shape(x)[0] % ways == 0) else rep

  def node(x):
    if isinstance(x, optim.CHILD_TYPES):
      return jax.tree.map(by_seed, x)
    if isinstance(x, knn.KasminaVars):
      # (a tree of shardings in the state's own structure: its static `live` kept)
      return x.replace(seeds=jax.tree.map(lambda _: rep, x.seeds),
                       telemetry=jax.tree.map(by_seed, x.telemetry), live=x.live)
    return rep

  return jax.tree.map(node, state,
                      is_leaf=lambda x: isinstance(x, optim.CHILD_TYPES + (knn.KasminaVars,)))


def is_replicated(tree: Any) -> bool:
  """Whether every array leaf of `tree` is fully replicated over its devices."""
  return all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree)
             if isinstance(x, jax.Array))


def replicas_agree(tree: Any) -> bool:
  """Whether all devices' copies of the same part of every array leaf are bitwise the same
  (for a replicated leaf: every device's whole copy): the check that no device diverged.
  Reads the shards this process holds."""
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    copies: dict = {}
    for shard in x.addressable_shards:
      where = tuple((i.start, i.stop, i.step) for i in shard.index)
      data = np.asarray(shard.data)
      # Bytes, not values: NaN == NaN here, and -0.0 != 0.0.
      if copies.setdefault(where, (data.shape, data.tobytes())) != (data.shape, data.tobytes()):
        return False
  return True


# ------------------------------------------------------------------------- compiled steps


@functools.lru_cache(maxsize=32)
def _compiled(mesh: Mesh, axis: str, seed_axis: str | None = None):
  rep = replicated(mesh)
  data = batch_sharding(mesh, axis)

  # The fused kernels run per device on their rows when the rows are split at all; on one
  # device the program is the single-device one (no `shard_map`, nothing else added).
  row_split = kernels.RowSplit(mesh, axis) if mesh.shape[axis] > 1 else None
  if seed_axis is None:
    # The wrapped functions are the jitted single-device ones: nested `jit` inlines, and the
    # shardings below make the batch split and every output replicated.
    def step(state, batch, loss_fn):
      return training.train_step(state, batch, loss_fn, row_split)

    def transition(state, val_batch, loss_fn, policy):
      return training.epoch_transition(state, val_batch, loss_fn, policy, row_split)

    def rollback(state, ctrl):
      return training.apply_rollback(state, ctrl)

    # The step forwards the state leaves it leaves alone, as `training.train_step` does
    # (`_forwarding`): the caller's replicated arrays, no copies.
    return (
        _forwarding.ForwardingJit(step, static_argnums=(2,), in_shardings=(rep, data),
                                  out_shardings=rep),
        # The validation batch is placed before the call (sharded when its rows divide over
        # the data axis, else replicated), so its sharding is taken from the argument.
        jax.jit(transition, static_argnums=(2, 3), out_shardings=rep),
        jax.jit(rollback, in_shardings=(rep, rep), out_shardings=rep),
    )

  # Seeds split over `seed_axis`: the state's shardings depend on its leaves' shapes, so they
  # are set as constraints at trace time (inputs are placed by `place_state`).
  def constrain(state):
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, seed_axis))

  def rep_all(tree):
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: rep, tree))

  # Seeds split too: the kernels' children enter their `shard_map` replicated, so they would
  # be gathered over the seed axis; the rows are split only over the data axis (`RowSplit`
  # leaves the other axes to XLA).
  def step_s(state, batch, loss_fn):
    new, metrics = training.train_step(constrain(state), batch, loss_fn, row_split)
    return constrain(new), rep_all(metrics)

  def transition_s(state, val_batch, loss_fn, policy):
    new, out = training.epoch_transition(constrain(state), val_batch, loss_fn, policy,
                                         row_split)
    return constrain(new), rep_all(out)

  def rollback_s(state, ctrl):
    new, fr = training.apply_rollback(constrain(state), rep_all(ctrl))
    return constrain(new), rep_all(fr)

  return (jax.jit(step_s, static_argnums=(2,)), jax.jit(transition_s, static_argnums=(2, 3)),
          jax.jit(rollback_s))


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """The data-parallel step functions over `mesh` (batch split along `axis`).

  Every method takes and returns a `TrainState` placed on `mesh` (see `data_parallel`):
  replicated, or with `seed_axis` (a second mesh axis, optional model parallelism) the
  seeds' children and telemetry split over it (`state_shardings`). Batches are global rows
  (numpy or JAX arrays) and are placed by the method. Epoch outputs are replicated.
  """

  mesh: Mesh
  axis: str = DATA_AXIS
  seed_axis: str | None = None

  def __post_init__(self):
    _check_mesh(self.mesh, self.axis)
    if self.seed_axis is not None:
      _check_mesh(self.mesh, self.seed_axis, "seed_axis")
      if self.seed_axis == self.axis:
        raise ValueError(f"seed_axis: must differ from the data axis {self.axis!r}")

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[self.axis]

  def place_state(self, state: training.TrainState) -> training.TrainState:
    return jax.device_put(state, state_shardings(state, self.mesh, self.seed_axis))

  def shard_batch(self, batch: dict, *, process_local: bool = False) -> dict:
    return shard_batch(batch, self.mesh, self.axis, process_local=process_local)

  def place_val_batch(self, batch: dict, *, process_local: bool = False) -> dict:
    """Sharded where the rows divide over the data axis, else a copy on every device."""
    rows = len(next(iter(batch.values()))) * (jax.process_count() if process_local else 1)
    if rows % self.num_shards == 0:
      return self.shard_batch(batch, process_local=process_local)
    if process_local and jax.process_count() > 1:
      raise ValueError(f"val_batch: {rows} global rows are not divisible by the "
                       f"{self.num_shards} devices of mesh axis {self.axis!r}")
    return replicate(batch, self.mesh)

  def train_step(self, state: training.TrainState, batch: dict,
                 loss_fn: training.LossFn) -> tuple[training.TrainState, dict]:
    """`training.train_step` with the batch split over the data axis."""
    step, _, _ = _compiled(self.mesh, self.axis, self.seed_axis)
    return step(state, self.shard_batch(batch), loss_fn)

  def lower_train_step(self, state: training.TrainState, batch: dict,
                       loss_fn: training.LossFn) -> jax.stages.Lowered:
    """The data-parallel step lowered for these arguments (`.compile().as_text()` is the
    program each device runs: what the tests and benchmarks inspect)."""
    step, _, _ = _compiled(self.mesh, self.axis, self.seed_axis)
    return step.lower(state, self.shard_batch(batch), loss_fn)

  def epoch_transition(self, state: training.TrainState, val_batch: dict,
                       loss_fn: training.LossFn, policy: Callable = tamiyo.decide):
    """`training.epoch_transition`; the report, commands and new state are replicated."""
    _, transition, _ = _compiled(self.mesh, self.axis, self.seed_axis)
    return transition(state, self.place_val_batch(val_batch), loss_fn, policy)

  def end_of_epoch(self, state: training.TrainState, val_batch: dict,
                   loss_fn: training.LossFn, *, policy: Callable = tamiyo.decide,
                   last_good=None, log=None):
    """`training.end_of_epoch` over the mesh: transition, emergency rollback, event log."""
    new_state, out = self.epoch_transition(state, val_batch, loss_fn, policy)
    _, _, rollback = _compiled(self.mesh, self.axis, self.seed_axis)
    # Nothing to restore: `training.rollback_in_place` keeps the state's placement.
    return training.finish_epoch(
        new_state, out, restore=lambda base, ctrl: rollback(self.place_state(base), ctrl),
        last_good=last_good, log=log)

  def fit(self, state: training.TrainState, train_data: dict, val_data: dict,
          loss_fn: training.LossFn, **kwargs):
    """See `fit`."""
    return fit(state, train_data, val_data, loss_fn, mesh=self.mesh, axis=self.axis,
               seed_axis=self.seed_axis, **kwargs)


def data_parallel(state: training.TrainState, mesh: Mesh | None = None,
                  axis: str = DATA_AXIS, *,
                  seed_axis: str | None = None) -> tuple[training.TrainState, DataParallel]:
  """`(state placed on mesh, DataParallel)`; `mesh` defaults to every device on one axis.

  `seed_axis`: a second axis of `mesh` over which each layer's seeds are split (see
  `state_shardings`, `data_seed_mesh`); None: everything replicated.
  """
  if not isinstance(state, training.TrainState):
    raise TypeError(f"state: expected a training.TrainState, got {type(state).__name__}")
  mesh = data_mesh(axis=axis) if mesh is None else mesh
  dp = DataParallel(mesh, axis, seed_axis)
  return dp.place_state(state), dp


# ------------------------------------------------------------------------------------ fit


def _process_rows(rows: int, mesh: Mesh) -> slice:
  """This process's block of a global batch of `rows` rows (all of it on one host)."""
  count = jax.process_count()
  if count == 1:
    return slice(0, rows)
  per = rows // count
  index = jax.process_index()
  del mesh  # the mesh is assumed to list devices in process order (`data_mesh` does)
  return slice(index * per, (index + 1) * per)


def fit(state: training.TrainState, train_data: dict, val_data: dict, loss_fn: training.LossFn,
        *, epochs: int, batch_size: int, mesh: Mesh | None = None, axis: str = DATA_AXIS,
        seed_axis: str | None = None, policy: Callable = tamiyo.decide, seed: int = 0, log_path: str | None = None,
        progress: bool = True, rollback: bool = True, description: str = "fit",
        num_classes="auto", max_skipped_epochs: int | None = 3):
  """`training.fit` over a device mesh: same arguments, same data order, same history, the
  same data checks before training (`num_classes`) and the same stop after
  `max_skipped_epochs` fully skipped epochs (`training.NonFiniteTrainingError`).

  `batch_size` is the global batch (rows per step over all devices); it must be divisible
  by the number of devices on `axis`. `seed_axis`: see `data_parallel`. On several hosts every process passes the whole data
  and logs only from process 0.
  """
  training.check_fit_args(train_data, epochs, batch_size, val_data=val_data, state=state,
                          loss_fn=loss_fn, num_classes=num_classes)
  mesh = data_mesh(axis=axis) if mesh is None else mesh
  dp = DataParallel(mesh, axis, seed_axis)
  if batch_size % dp.num_shards:
    raise ValueError(f"batch_size: {batch_size} is not divisible by the {dp.num_shards} "
                     f"devices of mesh axis {axis!r}")
  state = dp.place_state(state)
  local = _process_rows(batch_size, mesh)
  multi = jax.process_count() > 1
  val_local = val_data
  if multi:
    val_local = {k: v[_process_rows(len(v), mesh)] for k, v in val_data.items()}

  def hook(batch):
    if multi:
      return dp.shard_batch({k: v[local] for k, v in batch.items()}, process_local=True)
    return batch

  def end(state, _val, loss_fn, **kwargs):
    return dp.end_of_epoch(state, dp.place_val_batch(val_local, process_local=multi), loss_fn,
                           **kwargs)

  return training.fit_loop(
      state, train_data, val_data, loss_fn, epochs=epochs, batch_size=batch_size,
      policy=policy, seed=seed, log_path=log_path, progress=progress, rollback=rollback,
      description=description, step=dp.train_step, end=end, batch_hook=hook,
      primary=jax.process_index() == 0, run_info={"devices": int(mesh.devices.size)},
      max_skipped_epochs=max_skipped_epochs)

"""Runs one small growth run on a single device and data-parallel on meshes of several
(forced host) devices, with the same data order, and prints what each run measured as JSON.

Run by tests/test_distributed.py in a subprocess, because the device count
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) must be set before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/distributed_run.py 8 2 4x2

(`4x2`: 4 ways of data by 2 ways of seeds, each layer's seeds split over 2 devices.)
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kasmina_jax import blueprints, datasets, distributed, events, grafting, lifecycle, tamiyo
from kasmina_jax import training
from kasmina_jax import nn as knn

EPOCHS = 7
BATCH = 64
# Fewer rows than the global batch and more than one device's share: the correlation
# subsample spans several devices' rows.
CORR_ROWS = 24
LOSS = training.cross_entropy_loss


class Net(nn.Module):
  """2 -> 8 -> 8 -> 2, both hidden layers wrapped by Kasmina (parallel children)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = blueprints.default_blueprints(parallel_hidden=8)
    for i in range(2):
      x = knn.KasminaDense(8, 4, blueprints=catalog, activation=nn.relu, corr_rows=CORR_ROWS,
                           name=f"hidden{i}")(x, train=train)
    return nn.Dense(2, name="head")(x)


def config() -> training.TrainConfig:
  """Lifecycle timings for 20 steps an epoch: seeds germinate, graft and fossilize."""
  life = lifecycle.LifecycleConfig(min_training_steps=20, max_training_steps=200,
                                   stabilization_steps=10, fine_tuning_steps=20,
                                   fine_tuning_patience=2, embargo_epochs=2,
                                   improvement_margin=0.0)
  ctl = tamiyo.TamiyoConfig(plateau_patience=1, plateau_min_delta=1e-3,
                            max_concurrent_training=2, max_germinations_per_epoch=2,
                            germinate_without_plateau=True, lifecycle=life,
                            selection=tamiyo.SelectionStrategy.ACCURACY)
  return training.TrainConfig(grafting=grafting.GraftingConfig(fixed_steps=10), tamiyo=ctl)


TRAIN = datasets.two_spirals(20 * BATCH, seed=1)
# 500 rows: sharded over 2 devices, replicated over 8 (not divisible).
VAL = datasets.two_spirals(500, seed=2)
TX = optax.adam(1e-2)


def new_state():
  return training.create_train_state(Net(), TX, jnp.asarray(TRAIN["x"][:2]), jax.random.key(0),
                                     config())


def _np(tree):
  return events.to_json(tree)  # plain lists; NaN -> None


def _telemetry(state):
  return {training.layer_name(p): _np({f: getattr(v.telemetry, f) for f in (
      "count", "sum", "sumsq", "dead", "corr_count", "corr_sum", "gram", "grad_norm_sum")})
          for p, v in knn.find_layers(state.kasmina).items()}


def run(devices: str) -> dict:
  """`devices` "0": the single-device functions of `training`; "N": data-parallel over N
  devices; "NxS": N ways of data by S ways of seeds (each layer's seeds split over S)."""
  state = new_state()
  dp = None
  data, _, seeds = devices.partition("x")
  if seeds:
    mesh = distributed.data_seed_mesh(int(seeds), jax.devices()[:int(data) * int(seeds)])
    state, dp = distributed.data_parallel(state, mesh, seed_axis=distributed.SEED_AXIS)
    children = state.params["hidden0"]["kasmina"]["children"]
    assert not children.w1.sharding.is_fully_replicated, children.w1.sharding
  elif int(data):
    state, dp = distributed.data_parallel(state, distributed.data_mesh(jax.devices()[:int(data)]))
  step = dp.train_step if dp else training.train_step
  end = dp.end_of_epoch if dp else training.end_of_epoch
  epochs, agree = [], True
  for epoch in range(EPOCHS):
    rng = np.random.default_rng([0, epoch])
    losses = []
    for batch in training._batches(TRAIN, BATCH, rng):  # pylint: disable=protected-access
      state, metrics = step(state, batch, LOSS)
      losses.append(float(metrics["loss"]))
    telemetry = _telemetry(state)
    state, out, rolled_back = end(state, VAL, LOSS)
    if dp:
      agree &= distributed.replicas_agree((state, out)) and distributed.is_replicated(
          out if dp.seed_axis else (state, out))
    epochs.append({
        "losses": losses, "telemetry": telemetry, "rolled_back": rolled_back,
        "train_loss": float(out.train_loss), "val_loss": float(out.val_loss),
        "health": {k: _np({f: getattr(r.health, f) for f in (
            "chunk_variance", "dead_node_ratio", "avg_inter_node_correlation")})
                   for k, r in out.report.layers.items()},
        "delta": _np(out.delta), "commands": _np(out.commands), "accepted": _np(out.accepted),
        "stages": _np(out.new_stage),
        "field_reports": training.field_report_records(state, out.field_reports),
    })
  result = {"devices": devices, "epochs": epochs, "replicas_agree": bool(agree)}
  if dp:
    # `fit` over the same mesh: the same history as `training.fit` (checked by the caller).
    _, history = dp.fit(new_state(), TRAIN, VAL, LOSS, epochs=2, batch_size=BATCH,
                        progress=False)
  else:
    _, history = training.fit(new_state(), TRAIN, VAL, LOSS, epochs=2, batch_size=BATCH,
                              progress=False)
  result["fit"] = [{k: r[k] for k in ("train_loss", "val_loss", "stages")} for r in history]
  return result


def main(argv):
  counts = [int(np.prod([int(n) for n in a.split("x")])) for a in argv]
  if max(counts, default=1) > jax.device_count():
    raise SystemExit(f"asked for {max(counts)} devices, JAX sees {jax.device_count()}")
  runs = [run("0")] + [run(a) for a in argv]
  print(json.dumps({"runs": events.to_json(runs), "errors": errors(max(counts))}))


def errors(devices: int) -> dict:
  """The messages of the argument errors that need a mesh of several devices."""
  mesh = distributed.data_mesh(jax.devices()[:devices])
  rows = devices + devices // 2
  found = {}
  for name, call in (
      ("shard_batch", lambda: distributed.shard_batch({k: v[:rows] for k, v in TRAIN.items()},
                                                      mesh)),
      ("fit", lambda: distributed.fit(new_state(), TRAIN, VAL, LOSS, epochs=1, batch_size=rows,
                                      mesh=mesh, progress=False))):
    try:
      call()
      found[name] = None
    except ValueError as e:
      found[name] = str(e)
  return found


if __name__ == "__main__":
  main(sys.argv[1:])

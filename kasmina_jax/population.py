"""Whole growth runs as one pure function, batched with `jax.vmap`: the environment a learned
Tamiyo trains in (`examples/learn_tamiyo.py`).

`growth_run(env, member)` trains one small MLP with Kasmina layers from initialisation to its
last epoch: every step under `lax.scan` (`training.train_step`), every epoch end the library's
own `training.epoch_transition` with the member's controller, and the emergency rollback of
`training.fit` (restore the last good state, `training.apply_rollback`) done in the graph. So
a member is the run `fit` would make, batched: `run_population(env, members)` is
`jit(vmap(growth_run))`, and many runs (RNG seeds, data settings, learning rates, controllers)
train side by side in one program.

What varies per member (a `Member`, every leaf batched): the RNG key, the learning rate
(`optax.inject_hyperparams`, so one program serves every rate), the controller (the learned
policy's parameters, or the heuristic: `tamiyo.learned.decide(..., heuristic=True)`), and
the data (MNIST-1D's noise, data seed and number of training samples, padded to one shape: a
member samples its batches from its own first `fit_count` rows). What fixes the program's
shapes (an `EnvConfig`, static): the task, the host width, the number of rows, epochs and steps.
Settings of another shape (another host width, another task) are another group, another call.

Validation data is carved from each setting's training split (`make_data`); the test split
is kept apart (`MemberData.test`) and read only by `evaluate_test`.

The reward of a run (`reward`) is its final validation accuracy minus a parameter and a FLOP
cost, both relative to its initial host: `param_cost * (params / initial - 1) +
flop_cost * (train FLOPs / the host's own - 1)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kasmina_jax import _checks
from kasmina_jax import blueprints as bp_lib
from kasmina_jax import datasets
from kasmina_jax import experiments
from kasmina_jax import grafting
from kasmina_jax import lifecycle
from kasmina_jax import linen as knn
from kasmina_jax import tamiyo
from kasmina_jax import training
from kasmina_jax.tamiyo import learned

TASKS = ("mnist1d", "spirals")


class MLP(nn.Module):
  """`inputs -> width (x depth) -> classes`, every hidden layer a `KasminaDense` with
  parallel-wired children available (`child_width` hidden units each)."""

  width: int
  classes: int
  num_seeds: int = 4
  child_width: int = 32
  depth: int = 2

  @nn.compact
  def __call__(self, x, train: bool = True):
    catalog = bp_lib.default_blueprints(parallel_hidden=self.child_width)
    for i in range(self.depth):
      x = knn.KasminaDense(self.width, self.num_seeds, blueprints=catalog, activation=nn.relu,
                           corr_rows=64, name=f"hidden{i}")(x, train=train)
    return nn.Dense(self.classes, name="head")(x)


def short_lifecycle() -> lifecycle.LifecycleConfig:
  """The lifecycle's step counts scaled to runs of a few hundred steps (the library's are
  for thousands): a child can germinate, train, graft, be judged and fossilize in ~10 epochs."""
  return lifecycle.LifecycleConfig(min_training_steps=40, max_training_steps=400,
                                   stabilization_steps=20, fine_tuning_steps=60,
                                   embargo_epochs=3)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """What fixes a population's program (hashable: a static argument).

  task: "mnist1d" (40 inputs, 10 classes) or "spirals" (2 inputs, 2 classes).
  width, depth: the host's hidden width and its number of hidden (Kasmina) layers;
    num_seeds, child_width: seeds per layer and a parallel child's hidden width.
  grow: False trains the host as it is (a fixed baseline: no controller runs).
  epochs, steps_per_epoch, batch_size: the run's length; every member takes the same steps.
  fit_rows, val_rows, test_rows: rows of each member's padded training, validation and test
    arrays (a member uses its own first `fit_count` training rows).
  param_cost, flop_cost: the reward's cost weights.
  tamiyo: the controller's config (its lifecycle sets the gates' step counts).
  """

  task: str = "mnist1d"
  width: int = 32
  depth: int = 2
  num_seeds: int = 4
  child_width: int = 32
  grow: bool = True
  epochs: int = 12
  steps_per_epoch: int = 20
  batch_size: int = 64
  fit_rows: int = 2000
  val_rows: int = 400
  test_rows: int = 1000
  param_cost: float = 0.02
  flop_cost: float = 0.02
  tamiyo: tamiyo.TamiyoConfig = tamiyo.TamiyoConfig(lifecycle=short_lifecycle())

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
    for name in ("width", "depth", "num_seeds", "child_width", "epochs", "steps_per_epoch",
                 "batch_size", "fit_rows", "val_rows", "test_rows"):
      _checks.positive_int(name, getattr(self, name))
    if self.num_seeds > self.width:
      raise ValueError(f"num_seeds: {self.num_seeds} exceeds the host width {self.width}")
    if self.batch_size > self.fit_rows:
      raise ValueError(f"batch_size: {self.batch_size} exceeds fit_rows {self.fit_rows}")
    _checks.finite_float("param_cost", self.param_cost, min_value=0.0)
    _checks.finite_float("flop_cost", self.flop_cost, min_value=0.0)
    if not isinstance(self.grow, bool):
      raise TypeError(f"grow: expected a bool, got {self.grow!r}")
    if not isinstance(self.tamiyo, tamiyo.TamiyoConfig):
      raise TypeError(f"tamiyo: expected a TamiyoConfig, got {type(self.tamiyo).__name__}")

  @property
  def inputs(self) -> int:
    return 40 if self.task == "mnist1d" else 2

  @property
  def classes(self) -> int:
    return 10 if self.task == "mnist1d" else 2

  @property
  def train_config(self) -> training.TrainConfig:
    return training.TrainConfig(grafting=grafting.GraftingConfig(), tamiyo=self.tamiyo,
                                max_judged=2 * self.num_seeds)


@functools.lru_cache(maxsize=None)
def model_for(env: EnvConfig) -> MLP:
  """The env's model (one object per config, so compiled steps are shared)."""
  return MLP(env.width, env.classes, env.num_seeds, env.child_width, env.depth)


# A traced learning rate: one program serves every rate (the member's rate is written into
# the injected hyperparameter after `init`). One object, so `train_step`'s cache is shared.
_OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


# The states `inject_hyperparams` builds: optax before 0.2.4 made an `InjectHyperparamsState`;
# later versions make an `InjectStatefulHyperparamsState` (the older class is still exported,
# so testing for it alone finds nothing and leaves every member at the default rate).
_INJECT_STATES = tuple(getattr(optax, name) for name in
                       ("InjectStatefulHyperparamsState", "InjectHyperparamsState")
                       if hasattr(optax, name))


def _with_learning_rate(opt_state, lr):
  """`opt_state` with every injected `learning_rate` set to `lr`. Raises if none is found: a
  member whose rate is silently not written trains at the optimizer's default."""
  is_inject = lambda x: isinstance(x, _INJECT_STATES)
  found = []
  def set_lr(x):
    if not is_inject(x) or "learning_rate" not in x.hyperparams:
      return x
    found.append(True)
    hyper = dict(x.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, jnp.asarray(hyper["learning_rate"]).dtype)
    return x._replace(hyperparams=hyper)
  out = jax.tree.map(set_lr, opt_state, is_leaf=is_inject)
  if not found:
    raise ValueError("opt_state: no injected learning_rate found (expected the state of "
                     "optax.inject_hyperparams(...)(learning_rate=...))")
  return out


# ----------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Setting:
  """One task setting: the data a member trains on (`samples`: rows generated before the
  task's own train/test split; `noise`: MNIST-1D's correlated-noise scale, or the spirals'
  noise; None: the task's default)."""

  task: str = "mnist1d"
  samples: int = 3000
  noise: float | None = None
  data_seed: int = 0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
    _checks.positive_int("samples", self.samples)
    if self.noise is not None:
      _checks.finite_float("noise", self.noise, min_value=0.0)
    _checks.non_negative_int("data_seed", self.data_seed)

  def label(self) -> str:
    noise = "default" if self.noise is None else f"{self.noise:g}"
    return f"{self.task}/n{self.samples}/noise{noise}/data{self.data_seed}"


class MemberData(NamedTuple):
  """One setting's arrays, padded to the env's shapes (`*_count`: the real rows)."""

  fit_x: np.ndarray
  fit_y: np.ndarray
  fit_count: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  test_count: np.ndarray


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  out = np.zeros((rows,) + a.shape[1:], a.dtype)
  out[:min(rows, len(a))] = a[:rows]
  return out


@functools.lru_cache(maxsize=64)
def make_data(setting: Setting, env: EnvConfig) -> MemberData:
  """The setting's training split (validation rows carved from it, the rest for fitting),
  and its test split kept apart, padded to the env's shapes."""
  if setting.task != env.task:
    raise ValueError(f"setting: task {setting.task!r} does not match the env's {env.task!r}")
  if setting.task == "mnist1d":
    train, test = datasets.mnist1d(num_samples=setting.samples, noise=setting.noise,
                                   seed=setting.data_seed)
  else:
    noise = 0.3 if setting.noise is None else setting.noise
    n_test = max(1, setting.samples // 5)
    train = datasets.two_spirals(setting.samples - n_test, noise=noise, seed=setting.data_seed)
    test = datasets.two_spirals(n_test, noise=noise, seed=setting.data_seed + 10_000)
  n = len(train["x"])
  if n <= env.val_rows + env.batch_size:
    raise ValueError(f"setting: {setting.label()} has {n} training rows, too few for "
                     f"{env.val_rows} validation rows and a batch of {env.batch_size}")
  fit, val = experiments.carve_validation(train, env.val_rows / n, seed=setting.data_seed)
  val = {k: v[:env.val_rows] for k, v in val.items()}
  if len(val["x"]) < env.val_rows:
    # Rounding left one row short: take it from the fitting rows.
    need = env.val_rows - len(val["x"])
    val = {k: np.concatenate([val[k], fit[k][:need]]) for k in val}
    fit = {k: v[need:] for k, v in fit.items()}
  fit_count = min(len(fit["x"]), env.fit_rows)
  test_count = min(len(test["x"]), env.test_rows)
  return MemberData(
      fit_x=_pad(fit["x"], env.fit_rows), fit_y=_pad(fit["y"], env.fit_rows),
      fit_count=np.int32(fit_count), val_x=val["x"].astype(np.float32),
      val_y=val["y"].astype(np.int32), test_x=_pad(test["x"], env.test_rows),
      test_y=_pad(test["y"], env.test_rows), test_count=np.int32(test_count))


class Member(NamedTuple):
  """One run of a population (stack members with `stack_members`; test arrays excluded)."""

  key: jax.Array          # uint32 (2,): the run's RNG (jax.random.PRNGKey)
  learning_rate: jax.Array  # ()
  heuristic: jax.Array    # () bool: the heuristic controller instead of the learned one
  policy: learned.PolicyParams
  fit_x: jax.Array
  fit_y: jax.Array
  fit_count: jax.Array
  val_x: jax.Array
  val_y: jax.Array


def member(env: EnvConfig, setting: Setting, *, seed: int, learning_rate: float,
           policy: learned.PolicyParams | None = None, heuristic: bool = False) -> Member:
  """A `Member` for `setting` (`policy` None: the heuristic runs)."""
  _checks.non_negative_int("seed", seed)
  _checks.finite_float("learning_rate", learning_rate, min_value=0.0)
  if policy is None:
    policy, heuristic = learned.init(), True
  learned.check_params(policy)
  d = make_data(setting, env)
  # Host arrays: a population is stacked on the host and sent to the device once.
  return Member(key=np.asarray(jax.random.PRNGKey(seed)), learning_rate=np.float32(learning_rate),
                heuristic=np.asarray(bool(heuristic)),
                policy=jax.tree.map(lambda x: np.asarray(x, np.float32), policy),
                fit_x=d.fit_x, fit_y=d.fit_y, fit_count=d.fit_count, val_x=d.val_x,
                val_y=d.val_y)


def stack_members(members) -> Member:
  """Members stacked on a new leading axis (what `run_population` takes)."""
  members = list(members)
  if not members:
    raise ValueError("members: expected at least one Member")
  for i, m in enumerate(members):
    if not isinstance(m, Member):
      raise TypeError(f"members[{i}]: expected a Member, got {type(m).__name__}")
  shapes = {jax.tree.structure(m) for m in members}
  if len(shapes) != 1:
    raise ValueError("members: expected members of one structure (one policy hidden width)")
  for i, m in enumerate(members[1:], 1):
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(members[0])):
      if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"members[{i}]: shapes differ from members[0] ({jnp.shape(a)} vs "
                         f"{jnp.shape(b)}); group settings by shape")
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *members)


# ----------------------------------------------------------------------------------- one run


class RunOutcome(NamedTuple):
  """What one growth run produced (under `vmap`: every leaf with a leading member axis)."""

  val_accuracy: jax.Array    # () final validation accuracy
  val_loss: jax.Array        # ()
  params: jax.Array          # () int32: host + live children's parameters at the end
  initial_params: jax.Array  # () int32: the host's
  train_flops: jax.Array     # () forward + backward FLOPs of the live parameters, summed
  host_flops: jax.Array      # () the same for the host alone (the cost's reference)
  rollbacks: jax.Array       # () int32: emergency rollbacks
  fossilized: jax.Array      # () int32: seeds FOSSILIZED at the end
  curve_val_accuracy: jax.Array  # (epochs,)
  curve_params: jax.Array        # (epochs,)
  variables: Any             # {"params", "kasmina"}: the final model (for `evaluate_test`)


def reward(outcome: RunOutcome, env: EnvConfig) -> jax.Array:
  """Final validation accuracy minus the parameter and FLOP cost (see the module docstring)."""
  params = outcome.params.astype(jnp.float32) / outcome.initial_params.astype(jnp.float32)
  flops = outcome.train_flops / outcome.host_flops
  return (outcome.val_accuracy - env.param_cost * (params - 1.0)
          - env.flop_cost * (flops - 1.0))


def _active_params(kasmina) -> jax.Array:
  """Host-independent part: parameters of the live children (int32, in the graph)."""
  total = jnp.zeros((), jnp.int32)
  for lv in knn.find_layers(kasmina).values():
    live = lifecycle.stage_in(lv.seeds.stage, lifecycle.ACTIVE_STAGES)
    b = jnp.clip(lv.seeds.blueprint, 0, lv.spec.num_blueprints - 1)
    counts = jnp.asarray(lv.spec.catalog.param_count, jnp.int32)[b]
    total = total + jnp.sum(jnp.where(live, counts, 0))
  return total


def _host_params(state: training.TrainState) -> int:
  """Parameters outside the children (from shapes: a Python int even under `vmap`)."""
  is_child = training._is_child  # pylint: disable=protected-access
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  children = jax.tree.map(lambda c: c if is_child(c) else None, state.params, is_leaf=is_child)
  return total - sum(int(np.prod(x.shape)) for x in jax.tree.leaves(children))


def _select(pred, a, b):
  """`a` where `pred` else `b`, leaf by leaf (PRNG key leaves through their data)."""
  def leaf(x, y):
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.where(pred, jax.random.key_data(x),
                                                jax.random.key_data(y)))
    return jnp.where(pred, x, y)
  return jax.tree.map(leaf, a, b)


def _policy_for(env: EnvConfig, m: Member):
  if not env.grow:
    return experiments.no_growth
  return functools.partial(_member_decide, m.policy, m.heuristic)


def _member_decide(params, heuristic, report, seeds, ctrl, config):
  return learned.decide(params, report, seeds, ctrl, config, heuristic=heuristic)


def init_state(env: EnvConfig, m: Member) -> training.TrainState:
  """The member's fresh `TrainState` (its own key and learning rate)."""
  state = training.create_train_state(model_for(env), _OPTIMIZER,
                                      jnp.zeros((2, env.inputs), jnp.float32), m.key,
                                      env.train_config)
  return state.replace(opt_state=_with_learning_rate(state.opt_state, m.learning_rate))


def growth_run(env: EnvConfig, m: Member) -> RunOutcome:
  """One whole growth run (pure; `vmap` it over members). See the module docstring."""
  loss_fn = training.cross_entropy_loss
  state = init_state(env, m)
  host = _host_params(state)
  policy = _policy_for(env, m)
  val = {"x": m.val_x, "y": m.val_y}
  rows = env.steps_per_epoch * env.batch_size
  data_key = jax.random.fold_in(m.key, 1)

  def train_epoch(state, epoch):
    # Batches without replacement from the member's own rows (padding never drawn); the
    # epoch's order depends on (key, epoch) only.
    noise = jax.random.uniform(jax.random.fold_in(data_key, epoch), (env.fit_rows,))
    order = jnp.argsort(jnp.where(jnp.arange(env.fit_rows) < m.fit_count, noise, 2.0))
    # Fewer real rows than an epoch needs: wrap around them.
    idx = order[jnp.mod(jnp.arange(rows), jnp.maximum(m.fit_count, 1))]
    idx = idx.reshape(env.steps_per_epoch, env.batch_size)

    def step(s, batch_idx):
      s, _ = training.train_step(s, {"x": m.fit_x[batch_idx], "y": m.fit_y[batch_idx]},
                                 loss_fn)
      return s, None

    state, _ = jax.lax.scan(step, state, idx)
    return state

  def epoch_fn(carry, epoch):
    state, last_good = carry
    live_before = host + _active_params(state.kasmina)
    state = train_epoch(state, epoch)
    new_state, out = training.epoch_transition(state, val, loss_fn, policy)
    # `training.finish_epoch`'s rollback, in the graph: restore the last good state, roll
    # back its in-flight seeds, keep the controller's memory of the failed epoch.
    rolled = out.rollback_requested
    base = last_good.replace(epoch=new_state.epoch, rng=new_state.rng, stats=new_state.stats)
    restored, _ = training.apply_rollback(base, new_state.ctrl)
    new_state = _select(rolled, restored, new_state)
    last_good = _select(rolled, last_good, new_state)
    params_now = host + _active_params(new_state.kasmina)
    flops = 6.0 * live_before.astype(jnp.float32) * rows
    record = (out.val_metrics["accuracy"], out.val_loss, params_now, rolled, flops)
    return (new_state, last_good), record

  (state, _), (acc, vloss, params, rolled, flops) = jax.lax.scan(
      epoch_fn, (state, state), jnp.arange(env.epochs))
  fossilized = sum(jnp.sum((lv.seeds.stage == lifecycle.Stage.FOSSILIZED).astype(jnp.int32))
                   for lv in knn.find_layers(state.kasmina).values())
  return RunOutcome(
      val_accuracy=acc[-1], val_loss=vloss[-1], params=params[-1],
      initial_params=jnp.int32(host), train_flops=jnp.sum(flops),
      host_flops=jnp.float32(6.0 * host * rows * env.epochs),
      rollbacks=jnp.sum(rolled.astype(jnp.int32)), fossilized=fossilized,
      curve_val_accuracy=acc, curve_params=params,
      variables={"params": state.params, "kasmina": state.kasmina})


# XLA options that cut the CPU compile of a population program by ~2-3x (the run itself is
# small next to it in a short CPU session); not for accelerators.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}

_PROGRAMS: dict = {}


@functools.partial(jax.jit, static_argnums=0)
def _population(env: EnvConfig, members: Member) -> RunOutcome:
  return jax.vmap(functools.partial(growth_run, env))(members)


def run_population(env: EnvConfig, members: Member, *, fast_compile: bool = False) -> RunOutcome:
  """`growth_run` over a stack of members (`stack_members`), in one compiled program (kept
  per env, member shapes and `fast_compile`; `fast_compile` compiles with
  `FAST_COMPILE_OPTIONS`, for a CPU)."""
  if not isinstance(env, EnvConfig):
    raise TypeError(f"env: expected an EnvConfig, got {type(env).__name__}")
  if not isinstance(members, Member):
    raise TypeError(f"members: expected a stacked Member, got {type(members).__name__}")
  key = (env, bool(fast_compile), jax.tree.structure(members),
         tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(members)))
  program = _PROGRAMS.get(key)
  if program is None:
    lowered = _population.lower(env, members)
    program = lowered.compile(dict(FAST_COMPILE_OPTIONS) if fast_compile else None)
    _PROGRAMS[key] = program
  return program(members)


def run_batched(env: EnvConfig, members: list, batch: int, *,
                fast_compile: bool = False) -> RunOutcome:
  """`run_population` over `members` (a list) in chunks of exactly `batch` (the last chunk
  padded with copies of its first member, dropped after), so one compiled program serves
  any number of members. Returns the outcomes stacked in order (host arrays)."""
  batch = _checks.positive_int("batch", batch)
  if not members:
    raise ValueError("members: expected at least one Member")
  outs = []
  for i in range(0, len(members), batch):
    chunk = members[i:i + batch]
    n = len(chunk)
    chunk = chunk + [chunk[0]] * (batch - n)
    out = run_population(env, stack_members(chunk), fast_compile=fast_compile)
    outs.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# ----------------------------------------------------------------------------------- test


@functools.partial(jax.jit, static_argnums=0)
def _test_metrics(env: EnvConfig, variables, x, y, count):
  out = model_for(env).apply(variables, x, train=False)
  logits = out.astype(jnp.float32)
  mask = jnp.arange(x.shape[0]) < count
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  n = jnp.maximum(count, 1).astype(jnp.float32)
  return jnp.sum(jnp.where(mask, hit, 0.0)) / n, jnp.sum(jnp.where(mask, loss, 0.0)) / n


def evaluate_test(env: EnvConfig, variables, setting: Setting) -> dict:
  """Test accuracy and loss of one run's final model (`RunOutcome.variables` of one member)
  on its setting's test split: the only reader of the test split."""
  d = make_data(setting, env)
  acc, loss = _test_metrics(env, variables, jnp.asarray(d.test_x), jnp.asarray(d.test_y),
                            jnp.asarray(d.test_count))
  return {"accuracy": float(acc), "loss": float(loss)}

"""A learned Tamiyo: a small network decides *whether* a seed germinates and *what* it grows.

`decide(params, report, seeds, ctrl, config)` has `tamiyo.decide`'s contract once `params` is
bound (`policy(params)` binds it, for `training.fit(policy=...)`). It runs the heuristic's
steps and replaces only the two growth decisions with the network's:

* which of the germination candidates germinate: a seed germinates when its logit is > 0,
  the highest logits first, at most `max_germinations_per_epoch` over the model;
* which blueprint each germinating seed grows: the highest blueprint score.

Everything else is the heuristic's and is not learned (`tamiyo/policy.py`, in this order): the
emergency rollback (a non-finite or exploding loss, a fossil gone bad), the rollback or cancel
of a non-finite seed, culls, recovery cancels, success-path advances, promotion into the
per-layer training slots, the cooldown clock and the grafting strategy. The candidates are the
seeds the heuristic's safety rules allow: DORMANT, embargo over, room in the layer's queue
(`max_queued_per_layer`), not during an emergency or a cooldown (the heuristic's `min_need`
and `growth_patience` are *not* applied: when to stop growing is what the network learns,
from the layer's unpaid streak among its features). Commands still pass
`lifecycle.apply_commands`'s gates, so a policy cannot bypass one.

The network, per seed (shared by every seed of every layer):

  h = tanh(W_in f + b_in)                  f: SEED_FEATURES (every one finite, about in [-1, 1])
  germination logit = w_germ . h + b_germ
  blueprint score[b] = (h W_bp + v_bp) . g[b]   g: BLUEPRINT_FEATURES of blueprint b

so the same parameters serve any number of layers, seeds and blueprints. `init` starts at the
heuristic's defaults (germinate every candidate, grow the largest child).

`decide(..., heuristic=True)` (a traced bool is fine) makes the heuristic's choices instead,
exactly `tamiyo.decide`'s commands: one compiled program can run members of both
controllers side by side under `vmap` (the population environment does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kasmina_jax import _checks
from kasmina_jax import tolerance
from kasmina_jax.lifecycle import Stage
from kasmina_jax import lifecycle
from kasmina_jax.tamiyo.config import TamiyoConfig
from kasmina_jax.tamiyo.reports import EpochReport, _finite_or
from kasmina_jax.tamiyo.state import ControllerState
from kasmina_jax.tamiyo.policy import (
    _check_inputs,
    _finish,
    _heuristic_blueprint,
    _layer_commands,
    _plan,
    _recent,
    _signature,
    need_score)

# What the network sees of each seed (all finite; the order of `W_in`'s rows).
SEED_FEATURES = (
    "stuck",            # 1 - chunk variance / layer mean variance, clipped to [0, 1]
    "noise",            # chunk variance / layer mean - 1, clipped to [0, 1]
    "dead",             # dead-node ratio
    "correlation",      # average inter-node correlation
    "need",             # the heuristic's need score (weights of the config)
    "layer_need",       # the layer's mean need score
    "layer_occupied",   # fraction of the layer's seeds not DORMANT
    "layer_fossilized", # fraction of the layer's seeds FOSSILIZED
    "layer_delta",      # tanh(mean counterfactual delta of the layer's live seeds / 0.01)
    "layer_unpaid",     # the layer's unpaid streak / growth_patience, clipped to [0, 2]
    "model_occupied",   # fraction of the model's seeds not DORMANT
    "epoch",            # tanh(epoch / 16)
    "val_trend",        # tanh(10 x relative fall of the validation loss since the last epoch)
    "plateau",          # plateau epochs / plateau_patience, clipped to [0, 2]
    "gap",              # tanh(validation loss / training loss - 1)
)
# What the network sees of each blueprint of a layer's catalog (the columns of `W_bp`).
BLUEPRINT_FEATURES = (
    "capacity",     # parameters / the catalog's largest
    "flops",        # FLOPs per row / the catalog's largest
    "replacement",  # 1 for a replacement child
    "parallel",     # 1 for a parallel-wired child
    "reward",       # tanh of the layer's mean field-report reward for it (0 when untried)
)

NUM_SEED_FEATURES = len(SEED_FEATURES)
NUM_BLUEPRINT_FEATURES = len(BLUEPRINT_FEATURES)


class PolicyParams(NamedTuple):
  """The network's parameters (a pytree of float32 arrays; `hidden` = H)."""

  w_in: jax.Array    # (F, H)
  b_in: jax.Array    # (H,)
  w_germ: jax.Array  # (H,)
  b_germ: jax.Array  # ()
  w_bp: jax.Array    # (H, P)
  v_bp: jax.Array    # (P,)

  @property
  def hidden(self) -> int:
    return int(jnp.shape(self.b_in)[0])


def init(key: jax.Array | None = None, *, hidden: int = 16, scale: float = 0.1,
         germination_bias: float = 2.0) -> PolicyParams:
  """Parameters that start at the heuristic's defaults: every candidate germinates
  (`b_germ = germination_bias` > 0) and grows the largest child (`v_bp` weighs capacity);
  the weights of the hidden layer are `scale`-sized normals (zeros without `key`), the
  learnable part. A search starts better from a small bias (e.g. 0.5), where perturbations
  flip germinations, than from a saturated one, where every candidate acts alike."""
  hidden = _checks.positive_int("hidden", hidden)
  scale = _checks.finite_float("scale", scale, min_value=0.0)
  germination_bias = _checks.finite_float("germination_bias", germination_bias)
  f, p = NUM_SEED_FEATURES, NUM_BLUEPRINT_FEATURES
  if key is None:
    w_in = jnp.zeros((f, hidden), jnp.float32)
  else:
    w_in = scale * jax.random.normal(key, (f, hidden), jnp.float32)
  v_bp = jnp.zeros((p,), jnp.float32).at[BLUEPRINT_FEATURES.index("capacity")].set(1.0)
  return PolicyParams(w_in=w_in, b_in=jnp.zeros((hidden,), jnp.float32),
                      w_germ=jnp.zeros((hidden,), jnp.float32),
                      b_germ=jnp.float32(germination_bias),
                      w_bp=jnp.zeros((hidden, p), jnp.float32), v_bp=v_bp)


def check_params(params) -> int:
  """Raises (before tracing) unless `params` is a `PolicyParams` of consistent shapes;
  returns the hidden width."""
  if not isinstance(params, PolicyParams):
    raise TypeError(f"params: expected a learned.PolicyParams, got {type(params).__name__}")
  h = jnp.shape(params.b_in)
  if len(h) != 1 or h[0] < 1:
    raise ValueError(f"params.b_in: expected shape (H,), H >= 1, got {h}")
  h = h[0]
  want = {"w_in": (NUM_SEED_FEATURES, h), "b_in": (h,), "w_germ": (h,), "b_germ": (),
          "w_bp": (h, NUM_BLUEPRINT_FEATURES), "v_bp": (NUM_BLUEPRINT_FEATURES,)}
  for name, shape in want.items():
    got = jnp.shape(getattr(params, name))
    if got != shape:
      raise ValueError(f"params.{name}: expected shape {shape}, got {got}")
    dtype = jnp.result_type(getattr(params, name))
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"params.{name}: expected a float array, got dtype {dtype}")
  return h


# ----------------------------------------------------------------------------- features


def seed_features(report: EpochReport, seeds, ctrl: ControllerState,
                  config: TamiyoConfig = TamiyoConfig()) -> list:
  """Per layer (in `seeds`' flattening order) the (K, F) float32 matrix of `SEED_FEATURES`."""
  seed_leaves, report_leaves, ctrl_leaves, _ = _check_inputs(report, seeds, ctrl, config)
  return _features(report, seed_leaves, report_leaves, ctrl_leaves, ctrl, config)


def _features(report, seed_leaves, report_leaves, ctrl_leaves, ctrl, config) -> list:
  total = sum(s.num_seeds for s in seed_leaves)
  occupied_all = sum(jnp.sum((s.stage != Stage.DORMANT).astype(jnp.float32))
                     for s in seed_leaves) / total
  epoch = jnp.tanh(jnp.asarray(report.epoch, jnp.float32) / 16.0)
  val = jnp.asarray(report.val_loss, jnp.float32)
  train = jnp.asarray(report.train_loss, jnp.float32)
  last_val, has_last = _recent(ctrl.val_history, ctrl.history_count, 1)
  trend = (last_val[0] - val) / jnp.maximum(jnp.abs(last_val[0]), 1e-6)
  trend = jnp.where(has_last[0], _finite_or(jnp.tanh(10.0 * trend), 0.0), 0.0)
  plateau = jnp.clip(ctrl.plateau_epochs / config.plateau_patience, 0.0, 2.0)
  gap = _finite_or(jnp.tanh(val / jnp.maximum(train, 1e-6) - 1.0), 0.0)
  out = []
  for s, lr, lc in zip(seed_leaves, report_leaves, ctrl_leaves):
    k = s.num_seeds
    stuck, noise, dead, corr = _signature(lr.health)
    need = need_score(lr.health, config)
    live = lifecycle.stage_in(s.stage, lifecycle.ROLLBACK_STAGES)
    delta = _finite_or(jnp.asarray(s.delta, jnp.float32), 0.0)
    n_live = jnp.sum(live.astype(jnp.float32))
    layer_delta = jnp.where(n_live > 0, jnp.sum(jnp.where(live, delta, 0.0))
                            / jnp.maximum(n_live, 1.0), 0.0)
    per_layer = jnp.stack([
        jnp.mean(need),
        jnp.mean((s.stage != Stage.DORMANT).astype(jnp.float32)),
        jnp.mean((s.stage == Stage.FOSSILIZED).astype(jnp.float32)),
        jnp.tanh(layer_delta / 0.01),
        jnp.clip(lc.unpaid_streak / config.growth_patience, 0.0, 2.0),
        occupied_all, epoch, trend, plateau, gap]).astype(jnp.float32)
    per_seed = jnp.stack([stuck, noise, dead, corr, need], -1).astype(jnp.float32)
    out.append(jnp.concatenate([per_seed, jnp.broadcast_to(per_layer, (k, per_layer.shape[0]))],
                               -1))
  return out


def blueprint_features(layer_report, layer_ctrl) -> jax.Array:
  """(B, P) float32 `BLUEPRINT_FEATURES` of a layer's catalog."""
  params = jnp.asarray(layer_report.blueprint_params, jnp.float32)
  flops = jnp.asarray(layer_report.blueprint_flops, jnp.float32)
  mean = layer_ctrl.bp_reward_sum / jnp.maximum(layer_ctrl.bp_count, 1.0)
  return jnp.stack([
      params / jnp.maximum(jnp.max(params), 1.0),
      flops / jnp.maximum(jnp.max(flops), 1.0),
      jnp.asarray(layer_report.blueprint_replacement, bool).astype(jnp.float32),
      jnp.asarray(layer_report.blueprint_parallel, bool).astype(jnp.float32),
      jnp.tanh(_finite_or(mean, 0.0))], -1).astype(jnp.float32)


def apply(params: PolicyParams, features: jax.Array, bp_features: jax.Array):
  """The network: `(germination logits (K,), blueprint scores (K, B))` of one layer."""
  h = jnp.tanh(features @ params.w_in + params.b_in)
  logits = h @ params.w_germ + params.b_germ
  scores = (h @ params.w_bp + params.v_bp) @ bp_features.T
  return logits, scores


# ----------------------------------------------------------------------------- the policy


def _candidate_config(config: TamiyoConfig) -> TamiyoConfig:
  # The heuristic's candidates without its growth judgement (min_need, growth_patience):
  # only the safety rules (DORMANT, embargo, queue room, no emergency) remain.
  return dataclasses.replace(config, min_need=0.0, growth_patience=np.iinfo(np.int32).max)


def decide(params: PolicyParams, report: EpochReport, seeds, ctrl: ControllerState,
           config: TamiyoConfig = TamiyoConfig(), *, heuristic=False):
  """The learned policy: `(commands, ctrl)` as `tamiyo.decide` (see the module docstring).

  `heuristic`: a bool (or a traced bool scalar): True makes the heuristic's germination and
  blueprint choices instead of the network's (then the commands are `tamiyo.decide`'s)."""
  check_params(params)
  leaves = _check_inputs(report, seeds, ctrl, config)
  seed_leaves, report_leaves, ctrl_leaves, _ = leaves
  if jnp.shape(heuristic) != ():
    raise ValueError(f"heuristic: expected a bool scalar, got shape {jnp.shape(heuristic)}")
  heuristic = jnp.asarray(heuristic, bool)
  plan = _plan(report, ctrl, leaves, config)

  relaxed = _candidate_config(config)
  candidates = [_layer_commands(s, lr, lc, plan.emergency, relaxed)["eligible"]
                for s, lr, lc in zip(seed_leaves, report_leaves, ctrl_leaves)]
  features = _features(report, seed_leaves, report_leaves, ctrl_leaves, ctrl, config)
  logits, bp_choice = [], []
  for f, lr, lc in zip(features, report_leaves, ctrl_leaves):
    logit, scores = apply(params, f, blueprint_features(lr, lc))
    logits.append(_finite_or(logit, -1.0))
    bp_choice.append(tolerance.best_index(_finite_or(scores, -jnp.inf)))
  learned_chosen = _choose_by_logit(candidates, logits, plan.growth_time, config)

  chosen = [jnp.where(heuristic, h, l) for h, l in zip(plan.chosen, learned_chosen)]
  blueprints = [jnp.where(heuristic, _heuristic_blueprint(lr, lc, p, config), learned_bp)
                for lr, lc, p, learned_bp in zip(report_leaves, ctrl_leaves, plan.partial,
                                                 bp_choice)]
  return _finish(report, ctrl, leaves, plan, chosen, config, blueprints=blueprints)


def _choose_by_logit(candidates, logits, growth_time, config) -> list:
  """Per layer, the candidates whose logit is > 0, the highest (logits within the decision
  tolerance tie: the lower index) first, at most `max_germinations_per_epoch` over the model, only at growth time."""
  eligible = jnp.concatenate(candidates)
  logit = jnp.concatenate(logits)
  wanted = eligible & (logit > 0)
  rank = tolerance.stable_rank(logit, wanted)
  budget = (wanted.shape[0] if config.max_germinations_per_epoch is None
            else config.max_germinations_per_epoch)
  chosen = wanted & (rank < budget) & growth_time
  sizes = np.cumsum([0] + [c.shape[0] for c in candidates])
  return [chosen[sizes[i]:sizes[i + 1]] for i in range(len(candidates))]


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedPolicy:
  """`policy(params)`: `decide` with its parameters bound, a `tamiyo.decide`-shaped callable
  for `training.fit(policy=...)` (hashed by identity, as a static argument of `jit`)."""

  params: PolicyParams

  def __call__(self, report, seeds, ctrl, config=TamiyoConfig()):
    return decide(self.params, report, seeds, ctrl, config)


def policy(params: PolicyParams) -> Callable:
  """`decide` with `params` bound (see `LearnedPolicy`)."""
  check_params(params)
  return LearnedPolicy(jax.tree.map(jnp.asarray, params))


# ----------------------------------------------------------------------------- vectors, files


def to_vector(params: PolicyParams) -> jax.Array:
  """The parameters as one flat float32 vector (what evolution strategies perturb)."""
  check_params(params)
  return ravel_pytree(params)[0]


def from_vector(vector: jax.Array, hidden: int = 16) -> PolicyParams:
  """Inverse of `to_vector` for a network of `hidden` units (jittable in `vector`)."""
  template = init(hidden=hidden)
  flat, unravel = ravel_pytree(template)
  if jnp.shape(vector) != flat.shape:
    raise ValueError(f"vector: expected shape {flat.shape} for hidden={hidden}, got "
                     f"{jnp.shape(vector)}")
  return unravel(jnp.asarray(vector, jnp.float32))


def save(path: str, params: PolicyParams, **metadata) -> str:
  """Writes `params` to an `.npz` file (with string/number `metadata`); returns the path."""
  check_params(params)
  arrays = {f"param_{k}": np.asarray(v, np.float32) for k, v in params._asdict().items()}
  meta = {f"meta_{k}": np.asarray(v) for k, v in metadata.items()}
  with open(path, "wb") as fh:
    np.savez(fh, **arrays, **meta)
  return path


def load(path: str) -> PolicyParams:
  """Reads parameters written by `save` (shapes checked)."""
  with np.load(path) as npz:
    missing = [f for f in PolicyParams._fields if f"param_{f}" not in npz.files]
    if missing:
      raise ValueError(f"path: {path!r} holds no learned policy (missing {missing})")
    params = PolicyParams(**{f: jnp.asarray(npz[f"param_{f}"], jnp.float32)
                             for f in PolicyParams._fields})
  check_params(params)
  return params


def load_metadata(path: str) -> dict:
  """The metadata `save` wrote beside the parameters (plain Python values)."""
  with np.load(path) as npz:
    return {k[len("meta_"):]: npz[k].item() for k in npz.files if k.startswith("meta_")}


PRETRAINED_MNIST1D = os.path.join(os.path.dirname(__file__), "learned_mnist1d.npz")


def load_pretrained() -> PolicyParams:
  """The policy trained by `examples/learn_tamiyo.py` on MNIST-1D growth runs (shipped with
  the package; its metadata, `load_metadata(PRETRAINED_MNIST1D)`, says how it was trained)."""
  if not os.path.exists(PRETRAINED_MNIST1D):
    raise FileNotFoundError(f"{PRETRAINED_MNIST1D}: no trained policy shipped; run "
                            "examples/learn_tamiyo.py to train one")
  return load(PRETRAINED_MNIST1D)

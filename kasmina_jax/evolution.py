"""Antithetic evolution strategies (OpenAI-ES with mirrored sampling), pure JAX.

The search distribution is N(mean, sigma^2 I) over a flat parameter vector. One generation:

    candidates, noise = ask(state, config)            # (2N, D): mean + sigma*eps, mean - sigma*eps
    fitness = ...                                     # (2N,) higher is better, any scale
    state = tell(state, noise, fitness, config)       # Adam ascent on the ES gradient estimate

The gradient estimate is `sum_i (u(f+_i) - u(f-_i)) eps_i / (2 N sigma)`, `u` the centred
ranks of the fitness over all 2N candidates (in [-0.5, 0.5]; scale-free and robust to
outliers), minus `weight_decay * mean`. The step is Adam's (ascent). Every function is pure;
`save` / `load` write and read the whole state (a checkpoint: `mean`, Adam's moments, the
generation count and the key), so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kasmina_jax import _checks


@dataclasses.dataclass(frozen=True)
class ESConfig:
  """pairs: antithetic pairs a generation (2 x pairs candidates); sigma: the noise scale;
  learning_rate, beta1, beta2, eps: Adam's; weight_decay: pulls the mean towards 0."""

  pairs: int = 8
  sigma: float = 0.1
  learning_rate: float = 0.03
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0

  def __post_init__(self):
    _checks.positive_int("pairs", self.pairs)
    for name in ("sigma", "learning_rate", "eps"):
      _checks.finite_float(name, getattr(self, name))
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}: expected > 0, got {getattr(self, name)!r}")
    _checks.finite_float("beta1", self.beta1, min_value=0.0, max_value=0.999999)
    _checks.finite_float("beta2", self.beta2, min_value=0.0, max_value=0.999999)
    _checks.finite_float("weight_decay", self.weight_decay, min_value=0.0)

  @property
  def population(self) -> int:
    return 2 * self.pairs


class ESState(NamedTuple):
  """The search's whole state (a pytree; `save` / `load` checkpoint it)."""

  mean: jax.Array        # (D,) float32
  m: jax.Array           # (D,) Adam's first moment
  v: jax.Array           # (D,) Adam's second moment
  generation: jax.Array  # () int32: generations told so far
  key: jax.Array         # (2,) uint32 jax.random.PRNGKey


def init(mean: jax.Array, key: jax.Array) -> ESState:
  """A fresh search around `mean` (a flat float vector); `key` a `jax.random.PRNGKey`."""
  mean = jnp.asarray(mean, jnp.float32)
  if mean.ndim != 1 or mean.shape[0] < 1:
    raise ValueError(f"mean: expected a non-empty flat vector, got shape {mean.shape}")
  key = jnp.asarray(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise TypeError(f"key: expected a raw jax.random.PRNGKey (uint32 (2,)), got "
                    f"{key.dtype} {key.shape}")
  z = jnp.zeros_like(mean)
  return ESState(mean=mean, m=z, v=z, generation=jnp.zeros((), jnp.int32), key=key)


def _check_state(state) -> None:
  if not isinstance(state, ESState):
    raise TypeError(f"state: expected an ESState, got {type(state).__name__}")


def ask(state: ESState, config: ESConfig) -> tuple[jax.Array, jax.Array]:
  """`(candidates (2N, D), noise (N, D))` of this generation: rows `2i` and `2i + 1` are
  `mean + sigma * noise[i]` and `mean - sigma * noise[i]`. The noise depends only on the
  state's key and generation (an `ask` after `load` repeats the one before `save`)."""
  _check_state(state)
  key = jax.random.fold_in(state.key, state.generation)
  noise = jax.random.normal(key, (config.pairs, state.mean.shape[0]), jnp.float32)
  plus = state.mean + config.sigma * noise
  minus = state.mean - config.sigma * noise
  return jnp.stack([plus, minus], 1).reshape(config.population, -1), noise


def centred_ranks(fitness: jax.Array) -> jax.Array:
  """Ranks of `fitness` mapped to [-0.5, 0.5] (ties share their mean rank; non-finite
  values rank lowest)."""
  f = jnp.asarray(fitness, jnp.float32)
  f = jnp.where(jnp.isfinite(f), f, -jnp.inf)
  n = f.shape[0]
  # Mean rank of ties: count of strictly smaller + (count of equal - 1) / 2.
  less = jnp.sum(f[None, :] < f[:, None], axis=1).astype(jnp.float32)
  equal = jnp.sum(f[None, :] == f[:, None], axis=1).astype(jnp.float32)
  rank = less + (equal - 1.0) / 2.0
  return rank / jnp.maximum(n - 1, 1) - 0.5


def gradient(noise: jax.Array, fitness: jax.Array, config: ESConfig) -> jax.Array:
  """The ES estimate of the gradient of the expected fitness at the mean (D,), from the
  antithetic `noise` (N, D) and the candidates' `fitness` (2N,), in `ask`'s order."""
  u = centred_ranks(fitness).reshape(config.pairs, 2)
  return (u[:, 0] - u[:, 1]) @ noise / (2.0 * config.pairs * config.sigma)


def tell(state: ESState, noise: jax.Array, fitness: jax.Array, config: ESConfig) -> ESState:
  """The next state: one Adam ascent step on `gradient(noise, fitness) - weight_decay * mean`."""
  _check_state(state)
  fitness = jnp.asarray(fitness)
  if fitness.shape != (config.population,):
    raise ValueError(f"fitness: expected shape ({config.population},) (2 x pairs), got "
                     f"{fitness.shape}")
  if jnp.shape(noise) != (config.pairs, state.mean.shape[0]):
    raise ValueError(f"noise: expected shape ({config.pairs}, {state.mean.shape[0]}), got "
                     f"{jnp.shape(noise)}")
  g = gradient(noise, fitness, config) - config.weight_decay * state.mean
  t = state.generation + 1
  m = config.beta1 * state.m + (1.0 - config.beta1) * g
  v = config.beta2 * state.v + (1.0 - config.beta2) * g * g
  m_hat = m / (1.0 - config.beta1 ** t.astype(jnp.float32))
  v_hat = v / (1.0 - config.beta2 ** t.astype(jnp.float32))
  mean = state.mean + config.learning_rate * m_hat / (jnp.sqrt(v_hat) + config.eps)
  return ESState(mean=mean, m=m, v=v, generation=t, key=state.key)


def save(path: str, state: ESState, **extra_arrays) -> str:
  """Writes the state (and any extra named arrays, e.g. the history) to an `.npz` file,
  atomically (a temporary file renamed over `path`); returns the path."""
  import os  # pylint: disable=g-import-not-at-top
  _check_state(state)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as fh:
    np.savez(fh, **{f"es_{k}": np.asarray(v) for k, v in state._asdict().items()},
             **{f"extra_{k}": np.asarray(v) for k, v in extra_arrays.items()})
  os.replace(tmp, path)
  return path


def load(path: str) -> tuple[ESState, dict]:
  """`(state, extra arrays)` as `save` wrote them."""
  with np.load(path) as npz:
    missing = [f for f in ESState._fields if f"es_{f}" not in npz.files]
    if missing:
      raise ValueError(f"path: {path!r} holds no ES state (missing {missing})")
    state = ESState(**{f: jnp.asarray(npz[f"es_{f}"]) for f in ESState._fields})
    extra = {k[len("extra_"):]: npz[k] for k in npz.files if k.startswith("extra_")}
  return state, extra

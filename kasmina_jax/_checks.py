"""Argument checks run before tracing: bad input raises an error that names the argument."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name}: expected a positive int, got {value!r} ({type(value).__name__})")
  if value <= 0:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")
  return int(value)


def non_negative_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name}: expected a non-negative int, got {value!r} ({type(value).__name__})")
  if value < 0:
    raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
  return int(value)


def finite_float(name: str, value, *, min_value: float | None = None,
                 max_value: float | None = None) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name}: expected a float, got {value!r} ({type(value).__name__})")
  if not math.isfinite(value):
    raise ValueError(f"{name}: expected a finite float, got {value!r}")
  if min_value is not None and value < min_value:
    raise ValueError(f"{name}: expected >= {min_value}, got {value!r}")
  if max_value is not None and value > max_value:
    raise ValueError(f"{name}: expected <= {max_value}, got {value!r}")
  return float(value)


def int_like(name: str, value, expected: str):
  """Raises a TypeError naming `name` unless `value` is an int, a bool or an integer array
  (traced arrays included), before JAX sees it (its own error names no argument; a string,
  e.g. a blueprint's name where its id belongs, would otherwise reach `jnp.asarray`)."""
  if isinstance(value, jax.Array):
    dtype = value.dtype
  elif isinstance(value, (str, bytes)):
    dtype = None
  else:
    try:
      dtype = np.asarray(value).dtype
    except (TypeError, ValueError):
      dtype = None
  if dtype is None or not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
    shown = repr(value)
    shown = shown if len(shown) <= 60 else f"a {type(value).__name__}"
    raise TypeError(f"{name}: expected {expected}, got {shown}"
                    + (f" (dtype {dtype})" if dtype is not None else ""))
  return value


def integer_array(name: str, value) -> None:
  dtype = jnp.result_type(value)
  if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    raise TypeError(f"{name}: expected an integer array, got dtype {dtype}")


def float_array(name: str, value, allowed=(jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)) -> None:
  dtype = jnp.result_type(value)
  if dtype not in [jnp.dtype(a) for a in allowed]:
    raise TypeError(f"{name}: expected a floating array ({', '.join(str(jnp.dtype(a)) for a in allowed)}), got dtype {dtype}")


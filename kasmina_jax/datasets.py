"""Real data that needs no download: two spirals, MNIST-1D (procedural), and a character
corpus made of the Python standard library's own source files."""

from __future__ import annotations

import os
import sysconfig

import numpy as np

from kasmina_jax import _checks


def two_spirals(n: int, *, noise: float = 0.3, turns: float = 2.0, seed: int = 0):
  """`n` points of two interleaved spirals in 2-D (arms of `turns` turns), labels 0/1.

  Returns `{"x": float32 (n, 2), "y": int32 (n,)}` with `x` roughly in [-1, 1].
  """
  _checks.positive_int("n", n)
  _checks.finite_float("noise", noise, min_value=0.0)
  rng = np.random.default_rng(seed)
  t = np.sqrt(rng.uniform(0.0, 1.0, n)) * turns * 2 * np.pi
  y = rng.integers(0, 2, n)
  r = t / (turns * 2 * np.pi)
  angle = t + np.pi * y
  x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
  x = x + rng.normal(0.0, noise / (turns * 2 * np.pi), x.shape)
  return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


def mnist1d(*, num_samples: int = 5000, train_split: float = 0.8, noise: float | None = None,
            seed: int = 42):
  """MNIST-1D generated procedurally with `mnist1d.data.make_dataset` (never downloaded).

  Defaults are the package's (5000 samples, 4000 train / 1000 test). Returns
  `(train, test)` dicts with `x` float32 (n, 40) and `y` int32 (n,).
  """
  try:
    from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover
    raise ImportError("mnist1d: install the examples extra (pip install kasmina_jax[examples])") from e
  args = get_dataset_args()
  args.num_samples = int(num_samples)
  args.train_split = float(train_split)
  args.seed = int(seed)
  if noise is not None:
    args.corr_noise_scale = float(noise)
    args.iid_noise_scale = float(noise) * args.iid_noise_scale / max(get_dataset_args().corr_noise_scale, 1e-12)
  data = make_dataset(args)
  train = {"x": np.asarray(data["x"], np.float32), "y": np.asarray(data["y"], np.int32)}
  test = {"x": np.asarray(data["x_test"], np.float32), "y": np.asarray(data["y_test"], np.int32)}
  return train, test


def stdlib_corpus(max_bytes: int = 2_000_000, *, seed: int = 0) -> str:
  """Text of the Python standard library's own `.py` files (ships with every Python).

  Files are taken in a fixed sorted order and shuffled by `seed` at file granularity, then
  concatenated up to `max_bytes` characters (ASCII only; other characters dropped).
  """
  _checks.positive_int("max_bytes", max_bytes)
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests",
                                                          "__pycache__", "idlelib"))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  if not files:
    raise RuntimeError(f"stdlib_corpus: found no .py files under {root}")
  order = np.random.default_rng(seed).permutation(len(files))
  parts, size = [], 0
  for i in order:
    try:
      with open(files[i], encoding="utf-8", errors="ignore") as fh:
        text = fh.read().encode("ascii", errors="ignore").decode("ascii")
    except OSError:
      continue
    parts.append(text)
    size += len(text)
    if size >= max_bytes:
      break
  return "".join(parts)[:max_bytes]


def char_windows(text: str, context: int, *, vocab: str | None = None):
  """Encodes `text` over `vocab` (default: its sorted characters) and cuts it into
  non-overlapping windows of `context + 1` characters. Returns `(windows int32, vocab)`."""
  _checks.positive_int("context", context)
  vocab = vocab or "".join(sorted(set(text)))
  lut = {c: i for i, c in enumerate(vocab)}
  ids = np.array([lut[c] for c in text if c in lut], np.int32)
  n = len(ids) // (context + 1)
  return ids[: n * (context + 1)].reshape(n, context + 1), vocab

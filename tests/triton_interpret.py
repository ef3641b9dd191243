"""Runs `kasmina_jax.kernels.triton` on the CPU through Triton's interpreter (for
`benchmarks/check_triton.py --interpret` and, with KASMINA_TRITON_INTERPRET=1, the Triton tests
of `tests/test_kernels.py`; not in CI yet).

jax-triton has no CPU path (its `triton_call` lowers for GPUs only), so `stand_in()` builds a
stand-in `jax_triton` module whose `triton_call` runs the `@triton.jit` kernel under Triton's
interpreter (`TRITON_INTERPRET=1`, set before the kernels are first imported) inside a
`jax.pure_callback`, so the whole primitive (jit, custom_vjp, vmap) runs unchanged on numpy
buffers. Outputs are poisoned with NaN before each call (an aliased output starts as its
input), so an element a kernel fails to write shows up. The interpreter's `tl.dot` is a
float32 numpy matmul whatever its `input_precision`: this checks the kernels' logic, not TF32.
bfloat16 arrays are out of its reach (Triton 3.6: a masked bfloat16 load fails for want of
`get_bf16`, and unmasked ones read NaN in some runs); bfloat16 *operands* in registers work
once `_patch_bf16_dot` widens them for `tl.dot`.
Needs `triton` (3.6, the GPU image's; no GPU, no torch) and `numpy`. `install()` puts the
stand-in in `sys.modules` for a whole process (the benchmark script); tests patch it in.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np



class _D:
  def __init__(self, name):
    self.name = name

  def __str__(self):
    return "torch." + self.name


class _Storage:
  def __init__(self, arr):
    self.arr = arr

  def data_ptr(self):
    return self.arr.ctypes.data

  def cpu(self):
    return self

  def copy_(self, other):
    del other


class NpTensor:
  """The few torch.Tensor methods the Triton interpreter calls, over a numpy array."""

  def __init__(self, arr):
    self.arr = arr
    self.dtype = _D(str(arr.dtype))

  def data_ptr(self):
    return self.arr.ctypes.data

  def untyped_storage(self):
    return _Storage(self.arr)

  def new_empty(self, *a, **k):
    return self

  def set_(self, *a):
    return self

  def storage_offset(self):
    return 0

  def size(self):
    return self.arr.shape

  def stride(self):
    return tuple(s // self.arr.itemsize for s in self.arr.strides)


def triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None,
                input_output_aliases=None, zeroed_outputs=(), **metaparams):
  import jax  # pylint: disable=g-import-not-at-top
  del num_warps, num_stages
  aliases = dict(input_output_aliases or {})
  single = not isinstance(out_shape, (list, tuple))
  shapes = [out_shape] if single else list(out_shape)
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes]

  def host(*arrays):
    ins = [np.array(a, copy=True) for a in arrays]
    outs = []
    for i, s in enumerate(shapes):
      src = [j for j, o in aliases.items() if o == i]
      if src:
        outs.append(np.array(ins[src[0]], copy=True))
      elif i in zeroed_outputs:
        outs.append(np.zeros(s.shape, s.dtype))
      else:
        o = np.empty(s.shape, s.dtype)
        o[...] = np.nan if np.issubdtype(np.dtype(s.dtype), np.floating) or "float" in str(s.dtype) else 0
        outs.append(o)
    g = grid(metaparams) if callable(grid) else grid
    g = (g,) if isinstance(g, int) else tuple(g)
    kernel[g](*[NpTensor(a) for a in ins], *[NpTensor(o) for o in outs], **metaparams)
    return outs

  res = jax.pure_callback(host, shapes, *args)
  return res[0] if single else res


def _patch_bf16_dot() -> None:
  """Triton 3.6's interpreter stores bfloat16 as its uint16 bit patterns and its `tl.dot`
  multiplies those patterns as integers (a bfloat16 dot returns ~1e10 where it should
  return ~1). Widen bfloat16 operands to float32 first: exact, and what the tensor-core dot
  computes (float32 accumulation of bfloat16 products)."""
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
  builder = interpreter.InterpreterBuilder
  if getattr(builder.create_dot, "_kasmina_bf16", False):
    return
  original = builder.create_dot

  def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    def widen(h):
      if h.dtype.scalar == tl.bfloat16:
        return interpreter.TensorHandle(
            interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32),  # pylint: disable=protected-access
            tl.float32)
      return h
    return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

  create_dot._kasmina_bf16 = True  # pylint: disable=protected-access
  builder.create_dot = create_dot


def stand_in() -> types.ModuleType:
  """The stand-in `jax_triton` module (set `TRITON_INTERPRET=1` before the kernels load)."""
  _patch_bf16_dot()
  mod = types.ModuleType("jax_triton")
  mod.launches = []  # (kernel name, metaparameters) of every call, as traced

  def recording_call(*args, kernel, **kw):
    mod.launches.append((getattr(kernel, "__name__", str(kernel)), dict(kw)))
    return triton_call(*args, kernel=kernel, **kw)

  mod.triton_call = recording_call
  return mod


def install():
  os.environ["TRITON_INTERPRET"] = "1"
  sys.modules["jax_triton"] = stand_in()
  # The kernels module checks for a CUDA device in `available()`; callers of this helper call
  # the primitive directly, so nothing else needs patching.

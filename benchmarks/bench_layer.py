"""Benchmark of the chunked Kasmina layer on one GPU, all implementations in one run.

Measures, with device-side timing (warm-up, many repetitions, median):

  copy           device-to-device copy of `x` (torch `copy_`): the bandwidth ceiling
  jax_x2         `x * 2` under XLA (one read + one write, the same floor from JAX)
  read           `jnp.sum(x, 0)` under XLA: one read of `x` (the all-dormant floor)
  reference      `layer.forward(impl="reference")`: the pure-jnp layer under XLA
  pallas         `layer.forward(impl="pallas")`
  triton         `layer.forward(impl="triton")` (hand-written Triton through jax-triton)
  probe          the reference probe of docs/design.md, "Performance model" (`probe_kernel.py`:
  forward only, every seed's
                 child computed, no stage logic), the best of a short configuration sweep
  torch_loop     PyTorch, a loop over the seeds the way the older implementation did it
                 (`split` into chunks, one `nn.Module` child per active seed, blend, `cat`)
  torch_einsum   PyTorch, the children batched over seeds with `einsum`
  torch_compile  `torch.compile` of `torch_einsum`

on `rows x D` activations for every D, num_seeds (`node` = D, per-node mode), fraction of
seeds active (GRAFTING, alpha 0.5, so they blend), dtype and mode (forward; forward +
backward for `x` and every child parameter). Telemetry (sum, sum of squares and dead counts
per node) is on in every implementation; the correlation Gram matrix only with
`--corr-rows > 0` (off by default).

Bytes counted: forward `2 * bytes(x)` (read x, write out). Forward + backward
`4 * bytes(x)` (forward: read x, write out; backward: read the output gradient and x; while
seeds only blend, the input gradient *is* the output gradient and need not be written:
the four-pass floor, docs/design.md, "Performance model"). Forward + backward takes the output
itself as its cotangent
(the gradient of `0.5 * sum(out^2)`), an intermediate that dies in the backward, as in a
training step; it returns the telemetry, the input gradient and the child gradients. GB/s are those bytes over the measured time; `%copy` is that
rate over the copy's.

Every implementation is checked against the reference at the benchmarked shape (relative
error of the output, the telemetry sums and, for forward + backward, of every gradient)
before it is timed; one that is unavailable or fails is skipped with its reason printed.

  python benchmarks/bench_layer.py --dims 4096 --seeds 64 --active 1 --dtypes f32   # quick
  python benchmarks/bench_layer.py                                   # the full matrix

Writes `bench_layer.json` (one record per measurement) and `bench_layer.md` under `--out`
(default `$OUT`, else `benchmarks/out`), and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import traceback

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")
# Inductor's default cache location was not writable on the device image (torch.compile failed).
# ... nor was Triton's (torch.compile's kernels are Triton kernels): an empty TRITON_CACHE_DIR
# in the image's environment left Triton with no cache directory at all.
# 2026-12-06 it failed again with the variable set when unset or empty only: the image's
# value may name a directory this user cannot create or write. Use ours unless it is usable.
def _writable_dir(path: str) -> bool:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return False
  return os.access(path, os.W_OK | os.X_OK)


for _var, _dir in (("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_cache"),
                   ("TRITON_CACHE_DIR", "/tmp/triton_cache")):
  if not (os.environ.get(_var) and _writable_dir(os.environ[_var])):
    os.environ[_var] = _dir
    os.makedirs(_dir, exist_ok=True)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# XLA runs a `lax.cond`'s branches as CUDA-graph conditional nodes, whose kernels CUPTI
# reports as 0 ms (the reference's child GEMMs sit in such a branch: it timed faster than a
# copy of x). Time without command buffers: every kernel a plain launch, each one counted.
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kasmina_jax import blueprints as bp_lib  # noqa: E402
from kasmina_jax import layer as layer_lib  # noqa: E402
from kasmina_jax import lifecycle  # noqa: E402
from kasmina_jax.lifecycle import Stage  # noqa: E402

ALL_IMPLS = ("copy", "jax_x2", "read", "reference", "pallas", "triton", "probe", "torch_loop",
             "torch_einsum", "torch_compile")
JAX_LAYER_IMPLS = ("reference", "pallas", "triton")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=16384)
  p.add_argument("--dims", default="1024,4096,8192", help="comma list of D")
  p.add_argument("--seeds", default="4,64,node", help="comma list of num_seeds; 'node' = D")
  p.add_argument("--active", default="0,0.1,1", help="comma list of active fractions")
  p.add_argument("--dtypes", default="f32,bf16")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--impls", default=",".join(ALL_IMPLS))
  p.add_argument("--hidden", type=int, default=16, help="hidden width of the residual MLP child")
  p.add_argument("--corr-rows", type=int, default=0, help="Gram-matrix rows a step (0: off)")
  p.add_argument("--compile-shapes", default="4096x64",
                 help="DxK list where torch.compile runs ('all' for every shape)")
  p.add_argument("--compile-modes", default="fwd",
                 help="modes where torch.compile runs (each compile takes tens of seconds)")
  p.add_argument("--breakdown", action="store_true",
                 help="print the per-kernel times of the JAX implementations (first cell)")
  p.add_argument("--loop-max-seeds", type=int, default=256,
                 help="skip the per-seed PyTorch loop above this many seeds (its Python "
                      "overhead alone makes one call take seconds)")
  p.add_argument("--iterations", type=int, default=10, help="timed calls per measurement")
  p.add_argument("--repeats", type=int, default=3, help="measurements (median over all)")
  p.add_argument("--time-budget", type=float, default=540.0,
                 help="seconds; cells not started by then are skipped (listed)")
  p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "out"))
  p.add_argument("--no-validate", action="store_true")
  p.add_argument("--triton-configs", default="",
                 help="JSON of Triton tilings ({'kind/class/dtype': config}, as "
                      "tune_triton.py writes) to use instead of the defaults")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------ timing


def time_jax(fn, args, iterations, repeats):
  """Median device time (ms) of the jitted `fn(*args)`, summed over its kernels (CUPTI)."""
  if jax.devices()[0].platform != "gpu":  # a smoke run on CPU: host clock
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats * iterations):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  samples = []
  per_call = iterations
  for _ in range(repeats):
    try:
      _, t = profiler.measure(fn, aggregate=True, iterations=per_call)(*args)
    except RuntimeError as e:
      # A program with a `lax.cond` launches different kernels from call to call, which the
      # profiler refuses to aggregate over iterations: time one call at a time instead.
      if "not consistent" not in str(e) or per_call == 1:
        raise
      per_call = 1
      t = [profiler.measure(fn, aggregate=True, iterations=1)(*args)[1]
           for _ in range(iterations)]
    if t is None:
      return float("nan")
    samples.extend(t if isinstance(t, list) else [t])
  return float(np.median(samples))


def time_torch(fn, warmup_ms=50, rep_ms=300):
  import triton  # pylint: disable=g-import-not-at-top
  return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------ problem


@dataclasses.dataclass
class Problem:
  spec: layer_lib.KasminaSpec
  dtype: str
  active: np.ndarray  # (K,) bool
  x_np: np.ndarray  # float32 values (exactly representable in dtype)
  params: bp_lib.ChildParams  # float32, on device
  seeds: lifecycle.SeedState
  telemetry: object


def make_problem(rows, dim, num_seeds, frac, dtype, hidden, corr_rows, seed=0):
  blueprint = bp_lib.Blueprint("residual_mlp", hidden=hidden, activation="relu")
  # Telemetry on every row in every implementation (the reference's default measures one
  # row in four; the kernels measure all at no extra pass).
  spec = layer_lib.KasminaSpec(dim=dim, num_seeds=num_seeds, blueprints=(blueprint,),
                               corr_rows=corr_rows, telemetry_every=1)
  rng = np.random.default_rng(seed + 1000 * dim + num_seeds)
  k = num_seeds
  n_active = 0 if frac <= 0 else max(1, int(round(frac * k)))
  active = np.zeros(k, bool)
  if n_active:
    active[np.unique(np.linspace(0, k - 1, n_active).round().astype(int))] = True
  jdt = DTYPES[dtype]
  x_np = np.asarray(jnp.asarray(rng.standard_normal((rows, dim), np.float32), jdt)
                    .astype(jnp.float32))
  c, h = spec.chunk_width, spec.catalog.hidden
  nm = spec.node_mask.astype(np.float32)
  # Random children (a fresh residual child has f = 0, which would hide every error).
  w1 = rng.standard_normal((k, c, h)).astype(np.float32) / math.sqrt(c) * nm[:, :, None]
  b1 = 0.1 * rng.standard_normal((k, h)).astype(np.float32)
  w2 = 0.3 * rng.standard_normal((k, h, c)).astype(np.float32) / math.sqrt(h) * nm[:, None, :]
  b2 = 0.1 * rng.standard_normal((k, c)).astype(np.float32) * nm
  params = layer_lib.init_children(spec).replace(
      w1=jnp.asarray(w1), b1=jnp.asarray(b1), w2=jnp.asarray(w2), b2=jnp.asarray(b2))
  seeds = lifecycle.init_seed_state(k)
  seeds = seeds.replace(
      stage=jnp.asarray(np.where(active, int(Stage.GRAFTING), int(Stage.DORMANT)), jnp.int32),
      blueprint=jnp.asarray(np.where(active, 0, -1), jnp.int32),
      strategy=jnp.asarray(np.where(active, 0, -1), jnp.int32),
      alpha=jnp.asarray(np.where(active, 0.5, 0.0), jnp.float32))
  return Problem(spec=spec, dtype=dtype, active=active, x_np=x_np,
                 params=params, seeds=seeds, telemetry=layer_lib.init_telemetry(spec))


# ------------------------------------------------------------------------------ JAX impls


def jax_layer_fns(spec, impl):
  """(forward, forward+backward) jitted functions of the layer with telemetry on."""

  def fwd(params, seeds, x, tel):
    out, aux = layer_lib.forward(spec, params, seeds, x, telemetry=tel, impl=impl)
    return out, aux.telemetry

  def fwdbwd(params, seeds, x, tel):
    def f(x_, p_):
      out, aux = layer_lib.forward(spec, p_, seeds, x_, telemetry=tel, impl=impl)
      return out, aux.telemetry
    out, vjp, new_tel = jax.vjp(f, x, params, has_aux=True)
    # The cotangent is the output itself (the gradient of 0.5 * sum(out^2)): like a real
    # training step's, it is an intermediate that dies in the backward, so a backend may
    # reuse its buffer for the input gradient.
    dx, dp = vjp(out)
    return new_tel, dx, dp

  return jax.jit(fwd), jax.jit(fwdbwd)


def tel_arrays(tel):
  return {"sum": tel.sum, "sumsq": tel.sumsq, "dead": tel.dead}


def grad_arrays(dp):
  return {"d_w1": dp.w1, "d_b1": dp.b1, "d_w2": dp.w2, "d_b2": dp.b2}


# ------------------------------------------------------------------------------ torch impls


class TorchImpls:
  """The PyTorch baselines on the same problem (same x, children, stages, telemetry)."""

  def __init__(self, prob: Problem, device):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    spec = prob.spec
    self.dt = {"f32": torch.float32, "bf16": torch.bfloat16}[prob.dtype]
    self.sizes = list(spec.chunk_sizes)
    self.k = spec.num_seeds
    self.active = prob.active
    self.alpha = [0.5 if a else 0.0 for a in prob.active]
    self.eps = spec.dead_eps
    p = jax.tree.map(np.asarray, prob.params)
    self.p = p
    dev = device
    self.x = torch.tensor(prob.x_np, device=dev).to(self.dt)
    self.shift = self.x[0].float().clone()  # the reference's shift: the first row seen
    # the loop's modules, one per seed (built for every seed; only active ones are run)
    self.children = None
    if spec.dim == spec.num_seeds * spec.chunk_width:
      self.even = True
      c = spec.chunk_width
      self.W1 = torch.tensor(p.w1, device=dev).to(self.dt)
      self.b1 = torch.tensor(p.b1, device=dev).to(self.dt)
      self.W2 = torch.tensor(p.w2, device=dev).to(self.dt)
      self.b2 = torch.tensor(p.b2[:, :c], device=dev).to(self.dt)
      self.alpha_t = torch.tensor(self.alpha, device=dev, dtype=torch.float32).to(self.dt)
      self.any_active = bool(prob.active.any())
    else:
      self.even = False
    self.dev = dev

  def build_loop(self):
    torch = self.torch
    nn = torch.nn
    mods = []
    for i, c in enumerate(self.sizes):
      h = self.p.w1.shape[-1]
      m = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Linear(h, c))
      with torch.no_grad():
        m[0].weight.copy_(torch.tensor(self.p.w1[i, :c, :].T))
        m[0].bias.copy_(torch.tensor(self.p.b1[i]))
        m[2].weight.copy_(torch.tensor(self.p.w2[i, :, :c].T))
        m[2].bias.copy_(torch.tensor(self.p.b2[i, :c]))
      mods.append(m.to(self.dev, self.dt))
    self.children = nn.ModuleList(mods)

  def loop_forward(self, x):
    """The older implementation's way: split, per-seed child and blend, telemetry per chunk,
    cat."""
    torch = self.torch
    chunks = torch.split(x, self.sizes, dim=-1)
    shifts = torch.split(self.shift, self.sizes, dim=-1)
    outs, tel = [], []
    for i, ch in enumerate(chunks):
      d = ch.float() - shifts[i]
      tel.append((d.sum(0), (d * d).sum(0), (ch.abs() <= self.eps).sum(0)))
      if self.active[i]:
        g = ch + self.children[i](ch)  # residual child: g(x) = x + f(x)
        ch = ch + self.alpha[i] * (g - ch)
      outs.append(ch)
    return torch.cat(outs, dim=-1), tel

  def loop_params(self):
    return [q for i, m in enumerate(self.children) if self.active[i] for q in m.parameters()]

  def einsum_forward(self, x, W1, b1, W2, b2):
    torch = self.torch
    n = x.shape[0]
    xb = x.view(n, self.k, -1)
    d = xb.float() - self.shift.view(self.k, -1)
    tel = (d.sum(0), (d * d).sum(0), (xb.abs() <= self.eps).sum(0))
    if not self.any_active:
      return x, tel
    h = torch.relu(torch.einsum("nkc,kch->nkh", xb, W1) + b1)
    f = torch.einsum("nkh,khc->nkc", h, W2) + b2
    out = xb + self.alpha_t[:, None] * f  # dormant seeds have alpha 0
    return out.reshape(n, -1), tel


def _ensure_triton_cache():
  """Points Triton's cache at a writable directory through its knobs, not the environment.

  torch.compile failed twice on the device image with Triton's "Could not create or locate
  cache dir" although TRITON_CACHE_DIR named a writable directory: that message means
  `triton.knobs.cache.dir` read empty, so set the knob itself, and keep Inductor's compile
  in this process (its worker pool failed the same way in a subprocess)."""
  import torch  # pylint: disable=g-import-not-at-top
  import triton  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("TRITON_CACHE_DIR") or "/tmp/triton_cache"
  os.makedirs(cache, exist_ok=True)
  knobs = getattr(triton, "knobs", None)
  before = getattr(getattr(knobs, "cache", None), "dir", None)
  if knobs is not None and not before:
    knobs.cache.dir = cache
  torch._inductor.config.compile_threads = 1  # pylint: disable=protected-access
  print(f"# torch.compile: TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR')!r} "
        f"knobs.cache.dir {before!r} -> {getattr(getattr(knobs, 'cache', None), 'dir', None)!r}",
        flush=True)


def run_torch_cell(prob, impl, mode, args, ref, log):
  """Validates and times one PyTorch implementation; returns (ms, errors) or raises."""
  import torch  # pylint: disable=g-import-not-at-top
  ti = TorchImpls(prob, "cuda")
  if impl == "torch_loop":
    ti.build_loop()
    params = ti.loop_params()
    fwd = ti.loop_forward
  else:
    if not ti.even:
      raise RuntimeError("batched einsum baseline needs D divisible by num_seeds")
    params = [ti.W1, ti.b1, ti.W2, ti.b2]
    base = ti.einsum_forward
    if impl == "torch_compile":
      _ensure_triton_cache()
      base = torch.compile(ti.einsum_forward, dynamic=False)
    fwd = lambda x: base(x, *params)
  if mode == "fwd":
    def call():
      with torch.no_grad():
        return fwd(ti.x)
  else:
    xg = ti.x.detach().clone().requires_grad_(True)
    for q in params:
      q.requires_grad_(True)
    live = [q for q in params] if prob.active.any() else []

    def call():
      out, tel = fwd(xg)
      # the cotangent is the output (as in the JAX cells: the gradient of 0.5 * sum(out^2))
      grads = torch.autograd.grad(out, [xg] + live, out.detach(), allow_unused=True)
      return out, tel, grads
  res = call()
  torch.cuda.synchronize()
  errs = {}
  if mode == "fwd":
    errs["out"] = rel_err(res[0].detach().float().cpu().numpy(), ref["out"])
  if impl != "torch_loop":
    tel = res[1]
    k = prob.spec.num_seeds
    errs["sum"] = rel_err(tel[0].detach().cpu().numpy().reshape(k, -1), ref["sum"])
  if mode == "fwdbwd":
    # (the per-seed loop differentiates through the blend into the host, as the older
    # implementation did; the library stops that gradient while a seed is GRAFTING, so its
    # dx differs from the reference by design)
    errs["dx"] = rel_err(res[2][0].detach().float().cpu().numpy(), ref["dx"])
  del res
  ms = time_torch(call)
  return ms, errs


def run_probe_cell(prob, mode, x, ref, args):
  """The reference probe, its best configuration of a short sweep: (ms, errors, config)."""
  spec = prob.spec
  if mode != "fwd":
    raise RuntimeError("the probe has a forward only")
  if spec.dim % spec.num_seeds or spec.chunk_width < 16 or spec.num_seeds < 2:
    raise RuntimeError("the probe needs even chunks of >= 16 nodes")
  if jax.devices()[0].platform != "gpu":
    raise RuntimeError("the probe runs on the GPU only")
  import probe_kernel  # pylint: disable=g-import-not-at-top
  k, c, h = spec.num_seeds, spec.chunk_width, spec.catalog.hidden
  jdt = DTYPES[prob.dtype]
  p = prob.params
  w1, b1 = p.w1[:, :c, :h].astype(jdt), p.b1[:, :h].astype(jdt)
  w2, b2 = p.w2[:, :h, :c].astype(jdt), p.b2[:, :c].astype(jdt)
  alpha = jnp.asarray(np.where(prob.active, 0.5, 0.0), jnp.float32)
  pargs = (x, w1, b1, w2, b2, alpha)
  best = None
  for cfg in probe_kernel.CONFIGS:
    bm, rb, spp, warps, stages = cfg
    if k % spp or args.rows % (bm * rb):
      continue
    try:
      f = probe_kernel.make(args.rows, spec.dim, k, h, bm, rb, spp, warps, stages)
      out = jax.block_until_ready(f(*pargs))
      err = rel_err(np.asarray(out[0].astype(jnp.float32)), ref["out"])
      ms = time_jax(f, pargs, args.iterations, 1)
    except Exception:  # pylint: disable=broad-except
      continue
    if best is None or ms < best[0]:
      best = (ms, {"out": err}, dict(zip(("BM", "RB", "SPP", "num_warps", "num_stages"), cfg)))
  if best is None:
    raise RuntimeError("no probe configuration ran")
  ms = time_jax(probe_kernel.make(args.rows, spec.dim, k, h, *best[2].values()), pargs,
                args.iterations, args.repeats)
  return ms, best[1], best[2]


# ------------------------------------------------------------------------------ the run


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t_start = time.time()
  dims = [int(d) for d in args.dims.split(",") if d]
  seed_opts = [s for s in args.seeds.split(",") if s]
  fracs = [float(a) for a in args.active.split(",") if a]
  dtypes = [d for d in args.dtypes.split(",") if d]
  modes = [m for m in args.modes.split(",") if m]
  impls = [i for i in args.impls.split(",") if i]
  for i in impls:
    if i not in ALL_IMPLS:
      raise SystemExit(f"--impls: unknown {i!r}; known: {ALL_IMPLS}")
  compile_shapes = args.compile_shapes.split(",")

  if args.triton_configs:
    from kasmina_jax.kernels import triton as kt  # pylint: disable=g-import-not-at-top
    with open(args.triton_configs) as fh:
      for key, cfg in json.load(fh).items():
        kt.CONFIG_OVERRIDES[tuple(key.split("/"))] = cfg
    print("# Triton tilings:", json.dumps({"/".join(k): v for k, v in kt.CONFIG_OVERRIDES.items()}))

  dev = jax.devices()[0]
  info = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "rows": args.rows, "hidden": args.hidden,
          "corr_rows": args.corr_rows, "argv": sys.argv[1:],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    torch_ok = torch.cuda.is_available()
  except Exception:  # pylint: disable=broad-except
    torch_ok = False
  try:
    import triton  # pylint: disable=g-import-not-at-top
    info["triton"] = triton.__version__
  except Exception:  # pylint: disable=broad-except
    pass
  print("# bench_layer", json.dumps(info), flush=True)

  records = []
  skipped = []
  json_path = os.path.join(args.out, "bench_layer.json")

  def emit(rec):
    records.append(rec)
    print(f"  {rec['impl']:<14} {rec['mode']:<6} {rec['dtype']:<4} D={rec['dim']:<5} "
          f"K={rec['num_seeds']:<5} act={rec['active']:<4} "
          + (f"{rec['ms']:.4f} ms  {rec['gbps']:.0f} GB/s  {rec['pct_copy']:.0f}%copy"
             if rec.get("ms") is not None else f"SKIP {rec.get('skip')}")
          + (f"  err={json.dumps(rec['errors'])}" if rec.get("errors") else ""), flush=True)
    with open(json_path, "w") as fh:
      json.dump({"info": info, "records": records, "skipped": skipped}, fh, indent=1)

  copy_ms = {}  # (dim, dtype) -> ms of the copy (the ceiling)
  shown = set()
  for dtype in dtypes:
    for dim in dims:
      nbytes = args.rows * dim * (4 if dtype == "f32" else 2)
      base = dict(dtype=dtype, dim=dim, rows=args.rows, num_seeds=0, active=0.0, mode="fwd")
      xj = jnp.asarray(np.random.default_rng(0).standard_normal((args.rows, dim), np.float32),
                       DTYPES[dtype])
      if "copy" in impls and torch_ok:
        import torch  # pylint: disable=g-import-not-at-top
        xt = torch.randn(args.rows, dim, device="cuda").to(
            torch.float32 if dtype == "f32" else torch.bfloat16)
        yt = torch.empty_like(xt)
        ms = time_torch(lambda: yt.copy_(xt))
        copy_ms[(dim, dtype)] = ms
        emit({**base, "impl": "copy", "ms": ms, "gbps": 2 * nbytes / ms / 1e6, "pct_copy": 100.0})
        del xt, yt
      if "jax_x2" in impls:
        ms = time_jax(jax.jit(lambda x: x * 2), (xj,), args.iterations, args.repeats)
        copy_ms.setdefault((dim, dtype), ms)
        c = copy_ms[(dim, dtype)]
        emit({**base, "impl": "jax_x2", "ms": ms, "gbps": 2 * nbytes / ms / 1e6,
              "pct_copy": 100.0 * c / ms})
      if "read" in impls:
        ms = time_jax(jax.jit(lambda x: jnp.sum(x.astype(jnp.float32), 0)), (xj,),
                      args.iterations, args.repeats)
        c = copy_ms.get((dim, dtype), float("nan"))
        emit({**base, "impl": "read", "ms": ms, "gbps": nbytes / ms / 1e6,
              "pct_copy": 100.0 * (c / 2) / ms})
      del xj

  layer_impls = [i for i in impls if i in JAX_LAYER_IMPLS or i == "probe" or i.startswith("torch_")]
  for dtype in dtypes:
    for dim in dims:
      for s in seed_opts:
        k = dim if s == "node" else int(s)
        if k > dim:
          continue
        for frac in fracs:
          cell_t0 = time.time()
          if cell_t0 - t_start > args.time_budget:
            skipped.append(dict(dtype=dtype, dim=dim, num_seeds=k, active=frac,
                                reason="time budget"))
            print(f"  SKIP D={dim} K={k} act={frac} {dtype}: time budget", flush=True)
            continue
          prob = make_problem(args.rows, dim, k, frac, dtype, args.hidden, args.corr_rows)
          nbytes = args.rows * dim * (4 if dtype == "f32" else 2)
          c_ms = copy_ms.get((dim, dtype), float("nan"))
          x = jnp.asarray(prob.x_np, DTYPES[dtype])
          for mode in modes:
            passes = 2 if mode == "fwd" else 4
            base = dict(dtype=dtype, dim=dim, rows=args.rows, num_seeds=k, active=frac,
                        n_active=int(prob.active.sum()), mode=mode)
            ref = None
            for impl in layer_impls:
              rec = {**base, "impl": impl}
              try:
                if impl in JAX_LAYER_IMPLS:
                  f_fwd, f_fb = jax_layer_fns(prob.spec, impl)
                  if mode == "fwd":
                    fn, fargs = f_fwd, (prob.params, prob.seeds, x, prob.telemetry)
                    res = jax.block_until_ready(fn(*fargs))
                    got = {"out": res[0], **tel_arrays(res[1])}
                  else:
                    fn, fargs = f_fb, (prob.params, prob.seeds, x, prob.telemetry)
                    res = jax.block_until_ready(fn(*fargs))
                    got = {**tel_arrays(res[0]), "dx": res[1], **grad_arrays(res[2])}
                  got = {kk: np.asarray(jnp.asarray(v, jnp.float32)) for kk, v in got.items()}
                  del res
                  if impl == "reference":
                    ref = got
                  elif not args.no_validate:
                    if ref is None:
                      raise RuntimeError("no reference result to validate against "
                                         "(--no-validate times without one)")
                    rec["errors"] = {kk: rel_err(got[kk], ref[kk]) for kk in got}
                  ms = time_jax(fn, fargs, args.iterations, args.repeats)
                  if args.breakdown and (impl, mode, dtype, k) not in shown:
                    shown.add((impl, mode, dtype, k))
                    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
                    _, per_kernel = profiler.measure(fn, aggregate=False)(*fargs)
                    print(f"  kernels of {impl} {mode} {dtype} D={dim} K={k} act={frac}: "
                          + "; ".join(f"{nm[:60]} {t:.4f}" for nm, t in per_kernel), flush=True)
                elif impl == "probe":
                  if ref is None:
                    raise RuntimeError("no reference result to validate against")
                  ms, errs, cfg = run_probe_cell(prob, mode, x, ref, args)
                  rec["errors"] = errs
                  rec["config"] = cfg
                else:
                  if not torch_ok:
                    raise RuntimeError("torch with CUDA not available")
                  if ref is None:
                    raise RuntimeError("no reference result to validate against")
                  if impl == "torch_loop" and k > args.loop_max_seeds:
                    raise RuntimeError(f"per-seed loop skipped above {args.loop_max_seeds} "
                                       "seeds (--loop-max-seeds)")
                  if impl == "torch_compile" and (
                      mode not in args.compile_modes.split(",") or (
                          "all" not in compile_shapes and f"{dim}x{s}" not in compile_shapes
                          and f"{dim}x{k}" not in compile_shapes)):
                    raise RuntimeError("torch.compile only at --compile-shapes/--compile-modes")
                  ms, errs = run_torch_cell(prob, impl, mode, args, ref, print)
                  rec["errors"] = errs
                rec.update(ms=ms, gbps=passes * nbytes / ms / 1e6,
                           pct_copy=100.0 * (passes / 2) * c_ms / ms)
              except Exception as e:  # pylint: disable=broad-except
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                rec.update(ms=None, skip=msg)
                if os.environ.get("BENCH_TRACEBACK"):
                  traceback.print_exc()
              emit(rec)
            del ref
          del x, prob
          print(f"  (cell {time.time() - cell_t0:.1f}s, total {time.time() - t_start:.0f}s)",
                flush=True)

  md = markdown(info, records, skipped, copy_ms)
  with open(os.path.join(args.out, "bench_layer.md"), "w") as fh:
    fh.write(md)
  print(md)


def markdown(info, records, skipped, copy_ms):
  lines = [f"device: {info['device']}, jax {info['jax']}, torch {info.get('torch')}, "
           f"triton {info.get('triton')}, {info['date']}, rows {info['rows']}, child hidden "
           f"{info['hidden']}, Gram matrix {'on (' + str(info['corr_rows']) + ' rows)' if info['corr_rows'] else 'off'}",
           "",
           "ms (device-side median); in brackets % of the copy bandwidth (fwd: 2 passes, "
           "fwd+bwd: 4 passes over x)", ""]
  base = [r for r in records if r["num_seeds"] == 0 and r.get("ms") is not None]
  if base:
    lines += ["| baseline | dtype | D | ms | GB/s |", "| --- | --- | --- | --- | --- |"]
    for r in base:
      lines.append(f"| {r['impl']} | {r['dtype']} | {r['dim']} | {r['ms']:.4f} | {r['gbps']:.0f} |")
    lines.append("")
  impls = []
  for r in records:
    if r["num_seeds"] and r["impl"] not in impls:
      impls.append(r["impl"])
  keys = []
  for r in records:
    key = (r["mode"], r["dtype"], r["dim"], r["num_seeds"], r["active"])
    if r["num_seeds"] and key not in keys:
      keys.append(key)
  if keys:
    lines.append("| mode | dtype | D | K | active | " + " | ".join(impls) + " |")
    lines.append("| --- " * (5 + len(impls)) + "|")
    for key in keys:
      row = []
      for impl in impls:
        r = next((r for r in records if r["impl"] == impl and
                  (r["mode"], r["dtype"], r["dim"], r["num_seeds"], r["active"]) == key), None)
        if r is None:
          row.append("")
        elif r.get("ms") is None:
          row.append("skip")
        else:
          row.append(f"{r['ms']:.3f} ({r['pct_copy']:.0f}%)")
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]:g} | "
                   + " | ".join(row) + " |")
  skips = sorted({(r["impl"], r["skip"]) for r in records if r.get("skip")})
  if skips:
    lines += ["", "skipped:"] + [f"- {i}: {s}" for i, s in skips]
  if skipped:
    lines += ["", f"not run (time budget): {len(skipped)} cells"]
  errs = [(r["impl"], r["mode"], r["dtype"], r["dim"], r["num_seeds"], r["active"],
           max(r["errors"].values())) for r in records if r.get("errors")]
  if errs:
    worst = {}
    for impl, mode, dtype, *_rest, e in errs:
      kk = (impl, mode, dtype)
      worst[kk] = max(worst.get(kk, 0.0), e)
    lines += ["", "max relative error vs the reference (over every checked array and shape):"]
    lines += [f"- {i} {m} {d}: {e:.2e}" for (i, m, d), e in sorted(worst.items())]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()

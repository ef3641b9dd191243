"""The `@triton.jit` kernels of `kasmina_jax.kernels.triton` (imports triton: load lazily).

See that module for the tiling and the contract (`kernels.common`)."""

# pylint: disable=invalid-name

import triton
import triton.language as tl


@triton.jit
def _tanh(v):
  return 2.0 * tl.sigmoid(2.0 * v) - 1.0

@triton.jit
def _gelu(v):
  return 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))

@triton.jit
def _act(pre, a0, a1, a2, a3, ACTS: tl.constexpr):
  """sum_i a_i * act_i(pre): the seed's one-hot over ACTIVATIONS (identity, relu, gelu,
  tanh); only the activations present in the catalog (bit mask ACTS) are computed. With one
  activation in the catalog every seed's one-hot is 1 there: that activation alone, without
  the weighting (two instructions an element and hidden unit fewer: per-node mode evaluates
  its hidden units element-wise)."""
  if ACTS == 1:
    y = pre
  elif ACTS == 2:
    y = tl.maximum(pre, 0.0)
  elif ACTS == 4:
    y = _gelu(pre)
  elif ACTS == 8:
    y = _tanh(pre)
  else:
    y = pre * 0.0
    if ACTS & 1:
      y += a0 * pre
    if ACTS & 2:
      y += a1 * tl.maximum(pre, 0.0)
    if ACTS & 4:
      y += a2 * _gelu(pre)
    if ACTS & 8:
      y += a3 * _tanh(pre)
  return y

@triton.jit
def _gelu_grad(v):
  k0 = 0.7978845608028654
  t = _tanh(k0 * (v + 0.044715 * v * v * v))
  return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * k0 * (1.0 + 3 * 0.044715 * v * v)

@triton.jit
def _tanh_grad(v):
  th = _tanh(v)
  return 1.0 - th * th

@triton.jit
def _act_grad(pre, a0, a1, a2, a3, ACTS: tl.constexpr):
  """d `_act` / d pre (one activation in the catalog: its derivative alone)."""
  if ACTS == 1:
    g = pre * 0.0 + 1.0
  elif ACTS == 2:
    g = tl.where(pre > 0.0, 1.0, 0.0)
  elif ACTS == 4:
    g = _gelu_grad(pre)
  elif ACTS == 8:
    g = _tanh_grad(pre)
  else:
    g = pre * 0.0
    if ACTS & 1:
      g += a0
    if ACTS & 2:
      g += a1 * tl.where(pre > 0.0, 1.0, 0.0)
    if ACTS & 4:
      g += a2 * _gelu_grad(pre)
    if ACTS & 8:
      g += a3 * _tanh_grad(pre)
  return g

# -------------------------------------------------------------- tiles
@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
  """A tile load; unmasked where the shape is even (a mask the compiler cannot prove
  uniform stops it from vectorising the load)."""
  if MASKED:
    v = tl.load(ptr, mask=mask, other=0.0)
  else:
    v = tl.load(ptr)
  return v


@triton.jit
def _store(ptr, v, mask, MASKED: tl.constexpr):
  if MASKED:
    tl.store(ptr, v, mask=mask)
  else:
    tl.store(ptr, v)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, LOWP: tl.constexpr):
  """a @ b accumulating in float32: with LOWP (16-bit activations at JAX's default
  precision) on bfloat16 operands, as XLA's dot of bfloat16 arrays; else on float32 operands
  at input precision PREC."""
  if LOWP:
    r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
  else:
    r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
  return r


@triton.jit
def _dot_operand(w, LOWP: tl.constexpr):
  """A weight tile as `_dot` takes it, cast once before the tile loop (with LOWP, bfloat16)
  rather than in every tile's `_dot`."""
  if LOWP:
    r = w.to(tl.bfloat16)
  else:
    r = w
  return r


@triton.jit
def _acc(acc, v, ACC2D: tl.constexpr):
  """acc + v's column sums. ACC2D 0: `acc` is (columns,) and v's rows are summed every tile
  (across threads and warps); 1: `acc` has v's (rows, columns) shape, and the rows are summed
  once per strip (`_colsum`), no exchange per tile but a register per element; n > 1: `acc`
  is (n, columns) and v's row r is added to acc's row r % n. With n the rows one pass of
  the program's threads covers (the layout repeats every n rows), that folding stays inside
  each thread: no exchange per tile, and a fraction of 1's registers."""
  if ACC2D == 0:
    r = acc + tl.sum(v, 0)
  elif ACC2D == 1:
    r = acc + v
  else:
    r = acc + tl.sum(tl.reshape(v, (v.shape[0] // ACC2D, ACC2D, v.shape[1])), 0)
  return r


@triton.jit
def _colsum(acc, ACC2D: tl.constexpr):
  if ACC2D == 0:
    r = acc
  else:
    r = tl.sum(acc, 0)
  return r


@triton.jit
def _zero_sums(R: tl.constexpr, C: tl.constexpr, ACC2D: tl.constexpr, R2ROWS: tl.constexpr):
  """A forward program's five per-strip sums at 0 (see `_acc`): (C,) with ACC2D 0, (R, C)
  with 1, (ACC2D, C) above, except the residual's squares (the last). Those come from the
  child's dot, in the MMA layout, whose warps split the rows where the tile has 16 rows a
  warp, else the columns: folded like the telemetry sums they crossed warps every tile (512
  seeds of 8 nodes ran 1.8x slower on an H100). With R2ROWS (the warps split the rows only)
  they are summed over the columns every tile, within a warp, (R,); else kept per element,
  (R, C). H100, 2026-12-06: bf16 with a tenth of 64 seeds blending 0.109 ms against 0.127
  per element; 16 seeds of 256 nodes (BR=16 at 4 warps, the warps across the columns) 0.44
  ms summed per row against 0.40 per element."""
  if ACC2D == 0:
    z = tl.zeros([C], tl.float32)
    zr = z
  elif ACC2D == 1:
    z = tl.zeros([R, C], tl.float32)
    zr = z
  else:
    z = tl.zeros([ACC2D, C], tl.float32)
    if R2ROWS:
      zr = tl.zeros([R], tl.float32)
    else:
      zr = tl.zeros([R, C], tl.float32)
  return z, z, z, z, zr


@triton.jit
def _zero_grads(CP: tl.constexpr, HP: tl.constexpr):
  """A coarse backward program's gradient accumulators at 0: w1, b1, w2, b2, wg, bg, s."""
  return (tl.zeros([CP, HP], tl.float32), tl.zeros([HP], tl.float32),
          tl.zeros([HP, CP], tl.float32), tl.zeros([CP], tl.float32),
          tl.zeros([CP, HP], tl.float32), tl.zeros([HP], tl.float32),
          tl.zeros([CP], tl.float32))


@triton.jit
def _telemetry_terms(x, shift, m2, MASKED: tl.constexpr, DEAD_EPS: tl.constexpr):
  """A tile's telemetry terms per element: x - shift, its square and the dead indicator
  (float), masked elements 0."""
  dlt = x - shift[None, :]
  dead = tl.abs(x) <= DEAD_EPS
  if MASKED:
    dlt = tl.where(m2, dlt, 0.0)
    dead = dead & m2
  return dlt, dlt * dlt, dead.to(tl.float32)


@triton.jit
def _telemetry_tile(x, shift, m2, acc_s, acc_q, acc_d, acc_x2, TELEMETRY: tl.constexpr,
                    MASKED: tl.constexpr, DEAD_EPS: tl.constexpr, ACC2D: tl.constexpr):
  """Adds a tile's column sums to the strip's accumulators (`_acc`): with TELEMETRY the
  shifted sum, shifted sum of squares and dead count, else the sum of squares of x. Masked
  elements are 0 in x."""
  if TELEMETRY:
    dlt, dlt2, dead = _telemetry_terms(x, shift, m2, MASKED, DEAD_EPS)
    acc_s = _acc(acc_s, dlt, ACC2D)
    acc_q = _acc(acc_q, dlt2, ACC2D)
    acc_d = _acc(acc_d, dead, ACC2D)
  else:
    # With telemetry the wrapper derives sum(x^2) from the shifted sums (one reduction less).
    acc_x2 = _acc(acc_x2, x * x, ACC2D)
  return acc_s, acc_q, acc_d, acc_x2


@triton.jit
def _add2(a0, a1, b0, b1):
  return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
  return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
  return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _live_tile_sums(x, shift, m2, rr, acc_s, acc_q, acc_d, acc_x2, acc_r2,
                    TELEMETRY: tl.constexpr, MASKED: tl.constexpr, DEAD_EPS: tl.constexpr,
                    ACC2D: tl.constexpr, JOINT: tl.constexpr, R2ROWS: tl.constexpr):
  """A live tile's column sums: the telemetry sums (or x^2) and the residual's squares `rr`.
  With JOINT (and not ACC2D) they are reduced over the rows in one multi-operand reduction:
  one exchange between warps through shared memory, one barrier, where separate sums take
  one each."""
  if JOINT and not ACC2D:
    if TELEMETRY:
      dlt, dlt2, dead = _telemetry_terms(x, shift, m2, MASKED, DEAD_EPS)
      s_, q_, d_, r_ = tl.reduce((dlt, dlt2, dead, rr), 0, _add4)
      acc_s += s_
      acc_q += q_
      acc_d += d_
      acc_r2 += r_
    else:
      x2_, r_ = tl.reduce((x * x, rr), 0, _add2)
      acc_x2 += x2_
      acc_r2 += r_
  else:
    acc_s, acc_q, acc_d, acc_x2 = _telemetry_tile(x, shift, m2, acc_s, acc_q, acc_d, acc_x2,
                                                  TELEMETRY, MASKED, DEAD_EPS, ACC2D)
    if ACC2D > 1 and R2ROWS:  # see `_zero_sums`
      acc_r2 += tl.sum(rr, 1)
    else:
      acc_r2 = _acc(acc_r2, rr, 1 if ACC2D > 1 else ACC2D)
  return acc_s, acc_q, acc_d, acc_x2, acc_r2


@triton.jit
def _dormant_tile_sums(x, shift, m2, acc_s, acc_q, acc_d, acc_x2, TELEMETRY: tl.constexpr,
                       MASKED: tl.constexpr, DEAD_EPS: tl.constexpr, ACC2D: tl.constexpr,
                       JOINT: tl.constexpr):
  """`_live_tile_sums` without a child: the telemetry sums (or x^2) alone."""
  if JOINT and TELEMETRY and not ACC2D:
    dlt, dlt2, dead = _telemetry_terms(x, shift, m2, MASKED, DEAD_EPS)
    s_, q_, d_ = tl.reduce((dlt, dlt2, dead), 0, _add3)
    acc_s += s_
    acc_q += q_
    acc_d += d_
  else:
    acc_s, acc_q, acc_d, acc_x2 = _telemetry_tile(x, shift, m2, acc_s, acc_q, acc_d, acc_x2,
                                                  TELEMETRY, MASKED, DEAD_EPS, ACC2D)
  return acc_s, acc_q, acc_d, acc_x2


@triton.jit
def _squares_or_nan(f, r, ok):
  """r^2 where `ok` (f finite, or a masked element), else NaN (f * 0 of a non-finite f). A
  seed's sum of these is NaN exactly when one of its child outputs is not finite (every other
  term is >= 0 or +inf): the non-finite check costs no reduction of its own."""
  return tl.where(ok, r * r, f * 0.0)


@triton.jit
def _chunk_extent(k, Q: tl.constexpr, R: tl.constexpr):
  """Seed k's chunk width and first column (the first R chunks are one wider). Where D
  divides evenly (R == 0) both are constant multiples the compiler can see: the column mask
  is constant in runs of Q and the offset a multiple of Q, so masked tiles still load in
  vectors (`k * Q + min(k, 0)` hides that)."""
  if R == 0:
    ck = Q
    off = k * Q
  else:
    ck = Q + (k < R).to(tl.int32)
    off = k * Q + tl.minimum(k, R)
  return ck, off


@triton.jit
def _load_child(k, cols, colm, hs, hm, hmask, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr,
                s_ptr, act_ptr, glu_ptr, diag_ptr, C: tl.constexpr, H: tl.constexpr,
                HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, LOWP: tl.constexpr):
  """Seed k's child as a coarse program holds it across its tiles (forward and backward):
  the weight tiles as `_dot` takes them (w2's rows scaled by the hidden-unit mask `hmask`),
  the biases, the activation mix, and the GLU gate and diagonal scale where the catalog has
  them (else placeholders the compiler drops: wg, bg = w1, b1; sd = b2; glu False; diag 0)."""
  wm = colm[:, None] & hm[None, :]
  w1 = tl.load(w1_ptr + k * C * H + cols[:, None] * H + hs[None, :], mask=wm, other=0.0)
  w2 = tl.load(w2_ptr + k * H * C + hs[:, None] * C + cols[None, :],
               mask=hm[:, None] & colm[None, :], other=0.0) * hmask[:, None]
  b1 = tl.load(b1_ptr + k * H + hs, mask=hm, other=0.0)
  b2 = tl.load(b2_ptr + k * C + cols, mask=colm, other=0.0)
  a0 = tl.load(act_ptr + k * 4 + 0)
  a1 = tl.load(act_ptr + k * 4 + 1)
  a2 = tl.load(act_ptr + k * 4 + 2)
  a3 = tl.load(act_ptr + k * 4 + 3)
  if HAS_GLU:
    glu = tl.load(glu_ptr + k) > 0.0
    wg = tl.load(wg_ptr + k * C * H + cols[:, None] * H + hs[None, :], mask=wm, other=0.0)
    bg = tl.load(bg_ptr + k * H + hs, mask=hm, other=0.0)
  else:
    glu = False
    wg = w1
    bg = b1
  if HAS_DIAG:
    diag = tl.load(diag_ptr + k)
    sd = tl.load(s_ptr + k * C + cols, mask=colm, other=0.0) * diag
  else:
    diag = 0.0
    sd = b2
  return (_dot_operand(w1, LOWP), b1, _dot_operand(wg, LOWP), bg, _dot_operand(w2, LOWP), b2,
          sd, diag, glu, a0, a1, a2, a3)


@triton.jit
def _tile_rows(strip, t, off, cols, colm, N: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
               TILES: tl.constexpr):
  """Tile t of a strip: its rows, their mask, the (rows, chunk) mask and the offsets of the
  chunk's elements in a (N, D) array."""
  rows = (strip * TILES + t) * BR + tl.arange(0, BR)
  rm = rows < N
  return rows, rm, rm[:, None] & colm[None, :], rows[:, None] * D + off + cols[None, :]


@triton.jit
def _child_tile(xr, x, rows, rm, k, hs, hm, preu_ptr, w1, b1, wg, bg, w2, b2, sd, glu, a0, a1,
                a2, a3, K: tl.constexpr, H: tl.constexpr, ACTS: tl.constexpr,
                HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_PREU: tl.constexpr,
                PREC: tl.constexpr, LOWP: tl.constexpr):
  """The child on one tile (`xr` as loaded, `x` in float32), as the forward and the
  backward's recomputation run it: the hidden pre-activation, its activation, the GLU gate
  (1 where the seed has none; `av` itself, unused, without a GLU in the catalog), the gated
  activation and the output f."""
  pre = _dot(xr, w1, PREC, LOWP) + b1[None, :]
  if HAS_PREU:
    pre += tl.load(preu_ptr + rows[:, None] * (K * H) + k * H + hs[None, :],
                   mask=rm[:, None] & hm[None, :], other=0.0)
  av = _act(pre, a0, a1, a2, a3, ACTS)
  a = av
  gate = av
  if HAS_GLU:
    gate = tl.sigmoid(_dot(xr, wg, PREC, LOWP) + bg[None, :])
    gate = tl.where(glu, gate, 1.0)
    a = av * gate
  f = _dot(a, w2, PREC, LOWP) + b2[None, :]
  if HAS_DIAG:
    f += sd[None, :] * x
  return pre, av, gate, a, f


# -------------------------------------------------------------- coarse forward
@triton.jit
def _fwd_coarse_seed(strip, k, x_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr,
                     preu_ptr, shift_ptr, live_ptr, blend_ptr, act_ptr, glu_ptr, diag_ptr,
                     res_ptr, hmask_ptr, out_ptr, tsum_ptr, tsq_ptr, tdead_ptr, r2_ptr, x2_ptr,
                     bad_ptr, N: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                     Q: tl.constexpr, R: tl.constexpr, C: tl.constexpr, H: tl.constexpr,
                     CP: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr,
                     ACTS: tl.constexpr, HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr,
                     HAS_PREU: tl.constexpr, TELEMETRY: tl.constexpr, PREC: tl.constexpr,
                     LOWP: tl.constexpr, EVEN_C: tl.constexpr, MASKED: tl.constexpr,
                     DEAD_EPS: tl.constexpr, ACC2D: tl.constexpr, JOINT: tl.constexpr,
                     R2ROWS: tl.constexpr):
  """One seed's chunk over one strip of rows (see `fwd_coarse`)."""
  ck, off = _chunk_extent(k, Q, R)
  cols = tl.arange(0, CP)
  colm = cols < ck
  live = tl.load(live_ptr + k) > 0.0
  if TELEMETRY:
    shift = tl.load(shift_ptr + k * C + cols, mask=cols < C, other=0.0)
  else:
    shift = tl.zeros([CP], tl.float32)
  acc_s, acc_q, acc_d, acc_x2, acc_r2 = _zero_sums(BR, CP, ACC2D, R2ROWS)
  # Two loops, not a branch inside one: a dormant seed's chunk costs its read and its write,
  # and the live loop stays free of control flow (Triton pipelines its loads).
  if live:
    hs = tl.arange(0, HP)
    hm = hs < H
    blend = tl.load(blend_ptr + k)
    res = tl.load(res_ptr + k) > 0.0
    hmask = tl.load(hmask_ptr + k * H + hs, mask=hm, other=0.0)
    w1, b1, wg, bg, w2, b2, sd, diag, glu, a0, a1, a2, a3 = _load_child(
        k, cols, colm, hs, hm, hmask, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr,
        act_ptr, glu_ptr, diag_ptr, C, H, HAS_GLU, HAS_DIAG, LOWP)
    for t in range(TILES):
      rows, rm, m2, xo = _tile_rows(strip, t, off, cols, colm, N, D, BR, TILES)
      xr = _load(x_ptr + xo, m2, MASKED)
      x = xr.to(tl.float32)
      _, _, _, _, f = _child_tile(xr, x, rows, rm, k, hs, hm, preu_ptr, w1, b1, wg, bg, w2, b2,
                                  sd, glu, a0, a1, a2, a3, K, H, ACTS, HAS_GLU, HAS_DIAG,
                                  HAS_PREU, PREC, LOWP)
      finite = tl.abs(f) < 3.0e38
      r = tl.where(res, f, f - x)
      if MASKED:
        finite = finite | ~m2
        r = tl.where(m2, r, 0.0)
      acc_s, acc_q, acc_d, acc_x2, acc_r2 = _live_tile_sums(
          x, shift, m2, _squares_or_nan(f, r, finite), acc_s, acc_q, acc_d, acc_x2, acc_r2,
          TELEMETRY, MASKED, DEAD_EPS, ACC2D, JOINT, R2ROWS)
      out = x + blend * r
      _store(out_ptr + xo, out.to(out_ptr.dtype.element_ty), m2, MASKED)
    _store_seed_sums(strip, k, cols, acc_s, acc_q, acc_d, acc_x2, acc_r2, tsum_ptr, tsq_ptr,
                     tdead_ptr, r2_ptr, x2_ptr, bad_ptr, K, C, TELEMETRY, ACC2D)
  else:
    for t in range(TILES):
      _, _, m2, xo = _tile_rows(strip, t, off, cols, colm, N, D, BR, TILES)
      xr = _load(x_ptr + xo, m2, MASKED)
      acc_s, acc_q, acc_d, acc_x2 = _dormant_tile_sums(xr.to(tl.float32), shift, m2, acc_s,
                                                       acc_q, acc_d, acc_x2, TELEMETRY, MASKED,
                                                       DEAD_EPS, ACC2D, JOINT)
      _store(out_ptr + xo, xr, m2, MASKED)
    _store_seed_sums(strip, k, cols, acc_s, acc_q, acc_d, acc_x2, acc_r2, tsum_ptr, tsq_ptr,
                     tdead_ptr, r2_ptr, x2_ptr, bad_ptr, K, C, TELEMETRY, ACC2D)


@triton.jit
def _store_seed_sums(strip, k, cols, acc_s, acc_q, acc_d, acc_x2, acc_r2, tsum_ptr, tsq_ptr,
                     tdead_ptr, r2_ptr, x2_ptr, bad_ptr, K: tl.constexpr, C: tl.constexpr,
                     TELEMETRY: tl.constexpr, ACC2D: tl.constexpr):
  """One (strip, seed)'s sums: telemetry per node, the residual's and x's squares, and the
  non-finite flag (the residual sum is NaN exactly when a child output was not finite)."""
  pc = cols < C
  if TELEMETRY:
    po = (strip * K + k) * C + cols
    tl.store(tsum_ptr + po, _colsum(acc_s, ACC2D), mask=pc)
    tl.store(tsq_ptr + po, _colsum(acc_q, ACC2D), mask=pc)
    tl.store(tdead_ptr + po, _colsum(acc_d, ACC2D), mask=pc)
  if len(acc_r2.shape) == 1:  # summed per row (R2ROWS) or per tile: see `_zero_sums`
    r2 = tl.sum(acc_r2, 0)
  else:
    r2 = tl.sum(tl.sum(acc_r2, 0), 0)
  tl.store(r2_ptr + strip * K + k, r2)
  tl.store(x2_ptr + strip * K + k, tl.sum(_colsum(acc_x2, ACC2D), 0))
  tl.store(bad_ptr + strip * K + k, tl.where(r2 == r2, 0.0, 1.0))


@triton.jit
def fwd_coarse(x_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr, preu_ptr,
               shift_ptr, live_ptr, blend_ptr, act_ptr, glu_ptr, diag_ptr, res_ptr, hmask_ptr,
               out_ptr, tsum_ptr, tsq_ptr, tdead_ptr, r2_ptr, x2_ptr, bad_ptr,
               N: tl.constexpr, D: tl.constexpr, K: tl.constexpr, Q: tl.constexpr,
               R: tl.constexpr, C: tl.constexpr, H: tl.constexpr, CP: tl.constexpr,
               HP: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr, SPP: tl.constexpr,
               ACTS: tl.constexpr, HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr,
               HAS_PREU: tl.constexpr, TELEMETRY: tl.constexpr, PREC: tl.constexpr,
               LOWP: tl.constexpr, EVEN_C: tl.constexpr, MASKED: tl.constexpr,
               DEAD_EPS: tl.constexpr, ACC2D: tl.constexpr, JOINT: tl.constexpr,
               R2ROWS: tl.constexpr):
  """Program (strip, g): rows [strip * TILES * BR, + TILES * BR) of seeds g * SPP .. + SPP
  (SPP divides K), one `BR`-row tile at a time; telemetry sums per strip."""
  strip = tl.program_id(0)
  for j in tl.static_range(SPP):
    _fwd_coarse_seed(strip, tl.program_id(1) * SPP + j, x_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr,
                     w2_ptr, b2_ptr, s_ptr, preu_ptr, shift_ptr, live_ptr, blend_ptr, act_ptr,
                     glu_ptr, diag_ptr, res_ptr, hmask_ptr, out_ptr, tsum_ptr, tsq_ptr,
                     tdead_ptr, r2_ptr, x2_ptr, bad_ptr, N, D, K, Q, R, C, H, CP, HP, BR, TILES,
                     ACTS, HAS_GLU, HAS_DIAG, HAS_PREU, TELEMETRY, PREC, LOWP, EVEN_C, MASKED,
                     DEAD_EPS, ACC2D, JOINT, R2ROWS)


# -------------------------------------------------------------- coarse backward
@triton.jit
def _bwd_coarse_loop(strip, k, off, cols, colm, hs, hm, x_ptr, ct_ptr, preu_ptr, dx_ptr,
                     dpreu_ptr, w1, b1, wg, bg, w2, b2, sd, diag, glu, a0, a1, a2, a3, res,
                     blend, gb, hg, ctr2, repl, N: tl.constexpr, D: tl.constexpr,
                     K: tl.constexpr, H: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr,
                     BR: tl.constexpr, TILES: tl.constexpr, ACTS: tl.constexpr,
                     HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_PREU: tl.constexpr,
                     PREC: tl.constexpr, LOWP: tl.constexpr, MASKED: tl.constexpr,
                     WRITE_DX: tl.constexpr, PART: tl.constexpr):
  """The strip's tiles of one live seed: recomputes the child, accumulates the parameter
  gradients (w2 before its hidden mask) and, with WRITE_DX, writes the chunk's input
  gradient. PART (see `bwd_coarse`): 0 all of it; 1 the input side (w1, b1, wg, bg, pre_u,
  dx); 2 the output side (w2, b2, s)."""
  acc_w1, acc_b1, acc_w2, acc_b2, acc_wg, acc_bg, acc_s = _zero_grads(CP, HP)
  for t in range(TILES):
    rows, rm, m2, xo = _tile_rows(strip, t, off, cols, colm, N, D, BR, TILES)
    xr = _load(x_ptr + xo, m2, MASKED)
    x = xr.to(tl.float32)
    ct = _load(ct_ptr + xo, m2, MASKED).to(tl.float32)
    pre, av, gate, a, f = _child_tile(xr, x, rows, rm, k, hs, hm, preu_ptr, w1, b1, wg, bg, w2,
                                      b2, sd, glu, a0, a1, a2, a3, K, H, ACTS, HAS_GLU,
                                      HAS_DIAG, HAS_PREU, PREC, LOWP)
    r = tl.where(res, f, f - x)
    ctf = gb * ct + 2.0 * ctr2 * r
    if MASKED:
      ctf = tl.where(m2, ctf, 0.0)
    # (The order of the whole backward, PART 0, is the one ptxas allocates best: moving the
    # diagonal's sum first took the bf16 medium tiling from a 2968-byte spill to 8112.)
    if PART != 1:
      acc_w2 += _dot(tl.trans(a), ctf, PREC, LOWP)
      acc_b2 += tl.sum(ctf, 0)
    if PART != 2:
      da = _dot(ctf, tl.trans(w2), PREC, LOWP)
      if HAS_GLU:
        dgp = tl.where(glu, da * av * gate * (1.0 - gate), 0.0)
        if MASKED:
          dgp = tl.where(rm[:, None], dgp, 0.0)
        da = da * gate
        acc_wg += _dot(tl.trans(x), dgp, PREC, LOWP)
        acc_bg += tl.sum(dgp, 0)
      dpre = da * _act_grad(pre, a0, a1, a2, a3, ACTS)
      if MASKED:
        dpre = tl.where(rm[:, None] & hm[None, :], dpre, 0.0)
      acc_w1 += _dot(tl.trans(x), dpre, PREC, LOWP)
      acc_b1 += tl.sum(dpre, 0)
    if HAS_DIAG and PART != 1:
      acc_s += tl.sum(ctf * x, 0) * diag
    if HAS_PREU and PART != 2:
      tl.store(dpreu_ptr + rows[:, None] * (K * H) + k * H + hs[None, :], dpre,
               mask=rm[:, None] & hm[None, :])
    if WRITE_DX and PART != 2:
      dxc = _dot(dpre, tl.trans(w1), PREC, LOWP)
      if HAS_GLU:
        dxc += _dot(dgp, tl.trans(wg), PREC, LOWP)
      if HAS_DIAG:
        dxc += ctf * sd[None, :]
      dx = ct + hg * (dxc - repl * blend * ct)
      _store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), m2, MASKED)
  return acc_w1, acc_b1, acc_w2, acc_b2, acc_wg, acc_bg, acc_s


@triton.jit
def bwd_coarse(x_ptr, ct_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr, preu_ptr,
               live_ptr, blend_ptr, gblend_ptr, hgrad_ptr, ok_ptr, ctr2_ptr, act_ptr, glu_ptr,
               diag_ptr, res_ptr, hmask_ptr,
               dx_ptr, dw1_ptr, db1_ptr, dwg_ptr, dbg_ptr, dw2_ptr, db2_ptr, ds_ptr, dpreu_ptr,
               N: tl.constexpr, D: tl.constexpr, K: tl.constexpr, Q: tl.constexpr,
               R: tl.constexpr, C: tl.constexpr, H: tl.constexpr, CP: tl.constexpr,
               HP: tl.constexpr, BR: tl.constexpr, TILES: tl.constexpr, ACTS: tl.constexpr,
               HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_PREU: tl.constexpr,
               PREC: tl.constexpr, LOWP: tl.constexpr, EVEN_C: tl.constexpr,
               MASKED: tl.constexpr, PART: tl.constexpr):
  """Program (strip, k). A seed that is off (not live, or not ok) reads nothing; the input
  gradient (aliased to the output cotangent) is written only where the child is in the
  gradient path (host_grad > 0). PART 0: the whole backward. Chunks too wide for one
  program's registers to hold every gradient accumulator run it in two launches, each
  recomputing the child: PART 2 the output side (w2, b2, s) first, as it reads the output
  cotangent, then PART 1 the input side (w1, b1, wg, bg, pre_u) and the input gradient, which
  overwrites that cotangent (aliased). Each writes only its own gradients."""
  strip = tl.program_id(0)
  k = tl.program_id(1)
  ck, off = _chunk_extent(k, Q, R)
  cols = tl.arange(0, CP)
  colm = cols < ck
  hs = tl.arange(0, HP)
  hm = hs < H
  on = (tl.load(live_ptr + k) > 0.0) & (tl.load(ok_ptr + k) > 0.0)
  hg = tl.load(hgrad_ptr + k)
  hmask = tl.load(hmask_ptr + k * H + hs, mask=hm, other=0.0)
  acc_w1, acc_b1, acc_w2, acc_b2, acc_wg, acc_bg, acc_s = _zero_grads(CP, HP)
  if on:
    blend = tl.load(blend_ptr + k)
    gb = tl.load(gblend_ptr + k)
    ctr2 = tl.load(ctr2_ptr + k)
    res = tl.load(res_ptr + k) > 0.0
    repl = tl.where(res, 0.0, 1.0)
    w1, b1, wg, bg, w2, b2, sd, diag, glu, a0, a1, a2, a3 = _load_child(
        k, cols, colm, hs, hm, hmask, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr,
        act_ptr, glu_ptr, diag_ptr, C, H, HAS_GLU, HAS_DIAG, LOWP)
    # Two loops rather than a branch per tile: only a seed in the gradient path writes dx.
    if hg > 0.0:
      acc_w1, acc_b1, acc_w2, acc_b2, acc_wg, acc_bg, acc_s = _bwd_coarse_loop(
          strip, k, off, cols, colm, hs, hm, x_ptr, ct_ptr, preu_ptr, dx_ptr, dpreu_ptr, w1,
          b1, wg, bg, w2, b2, sd, diag, glu, a0, a1, a2, a3, res, blend, gb, hg, ctr2, repl, N,
          D, K, H, CP, HP, BR, TILES, ACTS, HAS_GLU, HAS_DIAG, HAS_PREU, PREC, LOWP, MASKED,
          True, PART)
    else:
      acc_w1, acc_b1, acc_w2, acc_b2, acc_wg, acc_bg, acc_s = _bwd_coarse_loop(
          strip, k, off, cols, colm, hs, hm, x_ptr, ct_ptr, preu_ptr, dx_ptr, dpreu_ptr, w1,
          b1, wg, bg, w2, b2, sd, diag, glu, a0, a1, a2, a3, res, blend, gb, hg, ctr2, repl, N,
          D, K, H, CP, HP, BR, TILES, ACTS, HAS_GLU, HAS_DIAG, HAS_PREU, PREC, LOWP, MASKED,
          False, PART)
  else:
    if HAS_PREU and PART != 2:
      for t in range(TILES):
        rows = (strip * TILES + t) * BR + tl.arange(0, BR)
        rm = rows < N
        tl.store(dpreu_ptr + rows[:, None] * (K * H) + k * H + hs[None, :],
                 tl.zeros([BR, HP], tl.float32), mask=rm[:, None] & hm[None, :])
  pc = cols < C
  base = strip * K + k
  if PART != 2:
    tl.store(dw1_ptr + base * C * H + cols[:, None] * H + hs[None, :], acc_w1,
             mask=pc[:, None] & hm[None, :])
    tl.store(db1_ptr + base * H + hs, acc_b1, mask=hm)
    if HAS_GLU:
      tl.store(dwg_ptr + base * C * H + cols[:, None] * H + hs[None, :], acc_wg,
               mask=pc[:, None] & hm[None, :])
      tl.store(dbg_ptr + base * H + hs, acc_bg, mask=hm)
  if PART != 1:
    tl.store(dw2_ptr + base * H * C + hs[:, None] * C + cols[None, :], acc_w2 * hmask[:, None],
             mask=hm[:, None] & pc[None, :])
    tl.store(db2_ptr + base * C + cols, acc_b2, mask=pc)
    if HAS_DIAG:
      tl.store(ds_ptr + base * C + cols, acc_s, mask=pc)

# -------------------------------------------------------------- per-node forward
@triton.jit
def _node_child(x, rows, rm, nodes, nm, h, w1t_ptr, b1t_ptr, wgt_ptr, bgt_ptr, w2t_ptr, preu_ptr,
                a0, a1, a2, a3, glu, D: tl.constexpr, H: tl.constexpr, ACTS: tl.constexpr,
                HAS_GLU: tl.constexpr, HAS_PREU: tl.constexpr, MASKED: tl.constexpr):
  """Hidden unit h of every node's child on a (BR, BN) tile: its contribution a_h * w2_h to
  the child's output. The weights are (H, D), transposed by the wrapper (w2 with its hidden
  mask applied), so a unit's weights over a block of nodes are one contiguous load; they are
  read every tile, from L1, rather than held in registers (3 H values a node)."""
  w1h = _load(w1t_ptr + h * D + nodes, nm, MASKED)
  b1h = _load(b1t_ptr + h * D + nodes, nm, MASKED)
  w2h = _load(w2t_ptr + h * D + nodes, nm, MASKED)
  pre = x * w1h[None, :] + b1h[None, :]
  if HAS_PREU:
    pre += tl.load(preu_ptr + rows[:, None] * (D * H) + nodes[None, :] * H + h,
                   mask=rm[:, None] & nm[None, :], other=0.0)
  a = _act(pre, a0, a1, a2, a3, ACTS)
  if HAS_GLU:
    wgh = _load(wgt_ptr + h * D + nodes, nm, MASKED)
    bgh = _load(bgt_ptr + h * D + nodes, nm, MASKED)
    a = a * tl.where(glu[None, :], tl.sigmoid(x * wgh[None, :] + bgh[None, :]), 1.0)
  return a * w2h[None, :]


@triton.jit
def fwd_node(x_ptr, w1t_ptr, b1t_ptr, wgt_ptr, bgt_ptr, w2t_ptr, b2_ptr, s_ptr, preu_ptr,
             shift_ptr, live_ptr, blend_ptr, act_ptr, glu_ptr, diag_ptr, res_ptr, hmask_ptr,
             out_ptr, tsum_ptr, tsq_ptr, tdead_ptr, r2_ptr, x2_ptr, bad_ptr,
             N: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
             BR: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr, ACTS: tl.constexpr,
             HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_PREU: tl.constexpr,
             TELEMETRY: tl.constexpr, MASKED: tl.constexpr, DEAD_EPS: tl.constexpr,
             JOINT: tl.constexpr, ACC2D: tl.constexpr):
  """Per-node mode: a program owns (BR, BN) element tiles of one strip; every node's child
  is evaluated element-wise, one hidden unit at a time (`_node_child`, unrolled), so every
  tensor keeps the tile's 2-D layout and nothing is reduced across threads per tile (the
  former (BR, BN, HP) tensors summed their hidden axis across lanes every tile). The
  per-node sums are folded as in the coarse forward (`_acc`, ACC2D). A block of nodes none
  of which is live runs a loop with no child work. `hmask_ptr` is unused (in w2t)."""
  strip = tl.program_id(0)
  nb = tl.program_id(1)
  nodes = nb * BN + tl.arange(0, BN)
  nm = nodes < D
  livef = tl.load(live_ptr + nodes, mask=nm, other=0.0)
  live = livef > 0.0
  any_live = tl.max(livef, 0) > 0.0
  if TELEMETRY:
    shift = tl.load(shift_ptr + nodes, mask=nm, other=0.0)
  else:
    shift = tl.zeros([BN], tl.float32)
  acc_s, acc_q, acc_d, acc_x2, _ = _zero_sums(BR, BN, ACC2D, False)
  acc_r2 = acc_x2
  if any_live:
    blend = tl.load(blend_ptr + nodes, mask=nm, other=0.0)
    res = tl.load(res_ptr + nodes, mask=nm, other=1.0) > 0.0
    b2 = tl.load(b2_ptr + nodes, mask=nm, other=0.0)
    a0 = tl.load(act_ptr + nodes * 4 + 0, mask=nm, other=0.0)[None, :]
    a1 = tl.load(act_ptr + nodes * 4 + 1, mask=nm, other=0.0)[None, :]
    a2 = tl.load(act_ptr + nodes * 4 + 2, mask=nm, other=0.0)[None, :]
    a3 = tl.load(act_ptr + nodes * 4 + 3, mask=nm, other=0.0)[None, :]
    glu = live  # a placeholder `_node_child` ignores without a GLU in the catalog
    if HAS_GLU:
      glu = tl.load(glu_ptr + nodes, mask=nm, other=0.0) > 0.0
    if HAS_DIAG:
      sd = tl.load(s_ptr + nodes, mask=nm, other=0.0) * tl.load(diag_ptr + nodes, mask=nm,
                                                                  other=0.0)
    for t in range(TILES):
      rows, rm, m2, xo = _tile_rows(strip, t, 0, nodes, nm, N, D, BR, TILES)
      x = _load(x_ptr + xo, m2, MASKED).to(tl.float32)
      f = tl.zeros([BR, BN], tl.float32) + b2[None, :]
      for h in tl.static_range(H):
        f += _node_child(x, rows, rm, nodes, nm, h, w1t_ptr, b1t_ptr, wgt_ptr, bgt_ptr, w2t_ptr,
                         preu_ptr, a0, a1, a2, a3, glu, D, H, ACTS, HAS_GLU, HAS_PREU, MASKED)
      if HAS_DIAG:
        f += sd[None, :] * x
      lm = m2 & live[None, :]
      r = tl.where(lm, tl.where(res[None, :], f, f - x), 0.0)
      acc_s, acc_q, acc_d, acc_x2 = _telemetry_tile(x, shift, m2, acc_s, acc_q, acc_d, acc_x2,
                                                    TELEMETRY, MASKED, DEAD_EPS, ACC2D)
      acc_r2 = _acc(acc_r2, _squares_or_nan(f, r, (tl.abs(f) < 3.0e38) | ~lm), ACC2D)
      out = x + blend[None, :] * r
      _store(out_ptr + xo, out.to(out_ptr.dtype.element_ty), m2, MASKED)
  else:
    for t in range(TILES):
      # (not `_`: Triton types a name across the kernel, and `_` is a tile of sums above)
      rows, rm, m2, xo = _tile_rows(strip, t, 0, nodes, nm, N, D, BR, TILES)
      xr = _load(x_ptr + xo, m2, MASKED)
      acc_s, acc_q, acc_d, acc_x2 = _dormant_tile_sums(xr.to(tl.float32), shift, m2, acc_s,
                                                       acc_q, acc_d, acc_x2, TELEMETRY, MASKED,
                                                       DEAD_EPS, ACC2D, JOINT)
      _store(out_ptr + xo, xr, m2, MASKED)
  acc_r2 = _colsum(acc_r2, ACC2D)
  if TELEMETRY:
    tl.store(tsum_ptr + strip * D + nodes, _colsum(acc_s, ACC2D), mask=nm)
    tl.store(tsq_ptr + strip * D + nodes, _colsum(acc_q, ACC2D), mask=nm)
    tl.store(tdead_ptr + strip * D + nodes, _colsum(acc_d, ACC2D), mask=nm)
  tl.store(x2_ptr + strip * D + nodes, _colsum(acc_x2, ACC2D), mask=nm)
  tl.store(r2_ptr + strip * D + nodes, acc_r2, mask=nm)
  tl.store(bad_ptr + strip * D + nodes, tl.where(acc_r2 == acc_r2, 0.0, 1.0), mask=nm)


# -------------------------------------------------------------- per-node backward
@triton.jit
def bwd_node(x_ptr, ct_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, w2_ptr, b2_ptr, s_ptr, preu_ptr,
             live_ptr, blend_ptr, gblend_ptr, hgrad_ptr, ok_ptr, ctr2_ptr, act_ptr, glu_ptr,
             diag_ptr, res_ptr, hmask_ptr,
             dx_ptr, dw1_ptr, db1_ptr, dwg_ptr, dbg_ptr, dw2_ptr, db2_ptr, ds_ptr, dpreu_ptr,
             N: tl.constexpr, D: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
             BR: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr, ACTS: tl.constexpr,
             HAS_GLU: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_PREU: tl.constexpr):
  strip = tl.program_id(0)
  nb = tl.program_id(1)
  nodes = nb * BN + tl.arange(0, BN)
  nm = nodes < D
  hs = tl.arange(0, HP)
  hm = hs < H
  onf = tl.where((tl.load(live_ptr + nodes, mask=nm, other=0.0) > 0.0)
                 & (tl.load(ok_ptr + nodes, mask=nm, other=0.0) > 0.0), 1.0, 0.0)
  on = onf > 0.0
  any_on = tl.max(onf, 0) > 0.0
  blend = tl.load(blend_ptr + nodes, mask=nm, other=0.0)
  gb = tl.load(gblend_ptr + nodes, mask=nm, other=0.0)
  hg = tl.load(hgrad_ptr + nodes, mask=nm, other=0.0) * onf
  any_dx = tl.max(hg, 0) > 0.0
  ctr2 = tl.load(ctr2_ptr + nodes, mask=nm, other=0.0)
  res = tl.load(res_ptr + nodes, mask=nm, other=1.0) > 0.0
  repl = tl.where(res, 0.0, 1.0)
  pm = nm[:, None] & hm[None, :] & on[:, None]
  po = nodes[:, None] * H + hs[None, :]
  w1 = tl.load(w1_ptr + po, mask=pm, other=0.0)
  b1 = tl.load(b1_ptr + po, mask=pm, other=0.0)
  w2 = tl.load(w2_ptr + po, mask=pm, other=0.0)
  hmask = tl.load(hmask_ptr + po, mask=pm, other=0.0)
  b2 = tl.load(b2_ptr + nodes, mask=nm, other=0.0)
  a0 = tl.load(act_ptr + nodes * 4 + 0, mask=nm, other=0.0)[None, :, None]
  a1 = tl.load(act_ptr + nodes * 4 + 1, mask=nm, other=0.0)[None, :, None]
  a2 = tl.load(act_ptr + nodes * 4 + 2, mask=nm, other=0.0)[None, :, None]
  a3 = tl.load(act_ptr + nodes * 4 + 3, mask=nm, other=0.0)[None, :, None]
  if HAS_GLU:
    glu = tl.load(glu_ptr + nodes, mask=nm, other=0.0) > 0.0
    wg = tl.load(wg_ptr + po, mask=pm, other=0.0)
    bg = tl.load(bg_ptr + po, mask=pm, other=0.0)
    acc_wg = tl.zeros([BN, HP], tl.float32)
    acc_bg = tl.zeros([BN, HP], tl.float32)
  if HAS_DIAG:
    diag = tl.load(diag_ptr + nodes, mask=nm, other=0.0)
    sd = tl.load(s_ptr + nodes, mask=nm, other=0.0) * diag
    acc_s = tl.zeros([BN], tl.float32)
  acc_w1 = tl.zeros([BN, HP], tl.float32)
  acc_b1 = tl.zeros([BN, HP], tl.float32)
  acc_w2 = tl.zeros([BN, HP], tl.float32)
  acc_b2 = tl.zeros([BN], tl.float32)
  if any_on:
    for t in range(TILES):
      rows = (strip * TILES + t) * BR + tl.arange(0, BR)
      rm = rows < N
      m2 = rm[:, None] & nm[None, :]
      lm = m2 & on[None, :]
      xo = rows[:, None] * D + nodes[None, :]
      x = tl.load(x_ptr + xo, mask=m2, other=0.0).to(tl.float32)
      ct = tl.load(ct_ptr + xo, mask=m2, other=0.0).to(tl.float32)
      pre = x[:, :, None] * w1[None, :, :] + b1[None, :, :]
      if HAS_PREU:
        pre += tl.load(preu_ptr + rows[:, None, None] * (D * H) + po[None, :, :],
                       mask=rm[:, None, None] & pm[None, :, :], other=0.0)
      av = _act(pre, a0, a1, a2, a3, ACTS)
      a = av
      if HAS_GLU:
        gate = tl.sigmoid(x[:, :, None] * wg[None, :, :] + bg[None, :, :])
        gate = tl.where(glu[None, :, None], gate, 1.0)
        a = av * gate
      a = a * hmask[None, :, :]
      f = tl.sum(a * w2[None, :, :], 2) + b2[None, :]
      if HAS_DIAG:
        f += sd[None, :] * x
      r = tl.where(lm, tl.where(res[None, :], f, f - x), 0.0)
      ctf = tl.where(lm, gb[None, :] * ct + 2.0 * r * ctr2[None, :], 0.0)
      acc_w2 += tl.sum(a * ctf[:, :, None], 0)
      acc_b2 += tl.sum(ctf, 0)
      da = ctf[:, :, None] * (w2 * hmask)[None, :, :]
      if HAS_GLU:
        dgp = tl.where(glu[None, :, None], da * av * gate * (1.0 - gate), 0.0)
        da = da * gate
        acc_wg += tl.sum(x[:, :, None] * dgp, 0)
        acc_bg += tl.sum(dgp, 0)
      dpre = da * _act_grad(pre, a0, a1, a2, a3, ACTS)
      acc_w1 += tl.sum(x[:, :, None] * dpre, 0)
      acc_b1 += tl.sum(dpre, 0)
      if HAS_DIAG:
        acc_s += tl.sum(ctf * x, 0) * diag
      if HAS_PREU:
        tl.store(dpreu_ptr + rows[:, None, None] * (D * H) + po[None, :, :], dpre,
                 mask=rm[:, None, None] & nm[None, :, None] & hm[None, None, :])
      if any_dx:
        dxc = tl.sum(dpre * w1[None, :, :], 2)
        if HAS_GLU:
          dxc += tl.sum(dgp * wg[None, :, :], 2)
        if HAS_DIAG:
          dxc += ctf * sd[None, :]
        dx = ct + hg[None, :] * (dxc - repl[None, :] * blend[None, :] * ct)
        tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=m2 & (hg > 0.0)[None, :])
  else:
    if HAS_PREU:
      for t in range(TILES):
        rows = (strip * TILES + t) * BR + tl.arange(0, BR)
        rm = rows < N
        tl.store(dpreu_ptr + rows[:, None, None] * (D * H) + po[None, :, :],
                 tl.zeros([BR, BN, HP], tl.float32),
                 mask=rm[:, None, None] & nm[None, :, None] & hm[None, None, :])
  pmask = nm[:, None] & hm[None, :]
  base = strip * D * H
  tl.store(dw1_ptr + base + po, acc_w1, mask=pmask)
  tl.store(db1_ptr + base + po, acc_b1, mask=pmask)
  tl.store(dw2_ptr + base + po, acc_w2, mask=pmask)
  tl.store(db2_ptr + strip * D + nodes, acc_b2, mask=nm)
  if HAS_GLU:
    tl.store(dwg_ptr + base + po, acc_wg, mask=pmask)
    tl.store(dbg_ptr + base + po, acc_bg, mask=pmask)
  if HAS_DIAG:
    tl.store(ds_ptr + strip * D + nodes, acc_s, mask=nm)

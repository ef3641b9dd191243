"""Tests of `kasmina_jax.lifecycle` through its public API.

The transition table is checked edge by edge against the design's state diagram (docs/design.md,
"Stages"), written out below. Random command sequences run eagerly, under `jax.jit` and under
`jax.vmap` over stacked layers, and are checked step by step against a pure-Python model of the
gates (`_oracle_*`), which shares no code with the library.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasmina_jax import lifecycle
from kasmina_jax.lifecycle import (
    LEGAL_TRANSITIONS,
    Commands,
    LifecycleConfig,
    Op,
    SeedState,
    Stage,
    apply_commands,
    cancel_germination,
    init_seed_state,
    make_commands,
    no_commands,
    request_germination,
    tick_epoch,
    tick_step,
    update_readiness,
)

# --------------------------------------------------------------------------------------------
# The design (docs/design.md, "Stages"), written out independently of the library.

SPEC_ORDER = ("DORMANT", "GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING",
              "FINE_TUNING", "FOSSILIZED", "CULLED", "CANCELLED", "ROLLED_BACK")
D, G, TR, GR, ST, EV, FT, FO, CU, CA, RB = range(11)

# The design's diagram, less FOSSILIZED -> DORMANT (FOSSILIZED is terminal).
SPEC_EDGES = frozenset({
    (D, G),  # request_germination()
    (G, TR),  # command from Tamiyo
    (G, CA),  # cancel_germination()
    (TR, GR),  # after reconstruction
    (TR, CU),  # reconstruction failure
    (TR, CA),  # cancel_germination()
    (GR, ST),  # alpha ramp complete
    (ST, EV),  # stabilization complete
    (EV, FT),  # positive evaluation
    (EV, CU),  # negative evaluation
    (FT, FO),  # global improvement
    (FT, CU),  # fails gate
    (CU, D),  # reset to dormant (after embargo)
    (CA, D),  # reset to dormant
    (TR, RB), (GR, RB), (ST, RB), (EV, RB), (FT, RB),  # emergency rollback
})
NOT_TAKEN = (FO, D)
TERMINAL = (FO, RB)
# The success-path advance of each stage (ADVANCE with target -1).
SUCCESS = {D: G, G: TR, TR: GR, GR: ST, ST: EV, EV: FT, FT: FO, CU: D, CA: D}
LIVE = (G, TR, GR, ST, EV, FT)  # stages whose steps are counted by tick_step
ALPHA_ONE = (ST, EV, FT, FO)  # stages entered with alpha = 1


def _reachable_from_dormant() -> set[int]:
  seen, todo = {D}, [D]
  while todo:
    s = todo.pop()
    for a, b in SPEC_EDGES:
      if a == s and b not in seen:
        seen.add(b)
        todo.append(b)
  return seen


REACHABLE = _reachable_from_dormant()

# --------------------------------------------------------------------------------------------
# Fixtures shared by the property tests: one config, fixed sizes, functions jitted once.

K = 4  # seeds per layer
NL = 2  # stacked layers
NB = 3  # blueprints
NS = 2  # grafting strategies
CFG = LifecycleConfig(min_training_steps=2, recon_tolerance=0.05, improvement_margin=0.0,
                      max_training_steps=50, stabilization_steps=2, fine_tuning_steps=2,
                      fine_tuning_patience=2, embargo_epochs=2)


def _cmd(state, op, target, blueprint, strategy, epoch):
  cmds = Commands(op=op, target=target, blueprint=blueprint, strategy=strategy)
  return apply_commands(state, cmds, CFG, num_blueprints=NB, num_strategies=NS, epoch=epoch)


def _ready(state, delta, recon, repl):
  return update_readiness(state, delta=delta, recon_ratio=recon, is_replacement=repl, config=CFG)


def _ramp(state):
  """Stands in for the grafting module: GRAFTING seeds gain alpha 0.5 (capped at 1)."""
  grafting = state.stage == Stage.GRAFTING
  return state.replace(alpha=jnp.where(grafting, jnp.minimum(state.alpha + 0.5, 1.0),
                                       state.alpha))


FUNCS = {"cmd": _cmd, "ready": _ready, "epoch": tick_epoch, "step": tick_step, "ramp": _ramp}
JITTED = {name: jax.jit(f) for name, f in FUNCS.items()}
VMAPPED = {name: jax.jit(jax.vmap(f)) for name, f in FUNCS.items()}

# --------------------------------------------------------------------------------------------
# Helpers.


def _np_state(state: SeedState) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in vars(state).items()}


def _assert_bits_equal(a, b, what=""):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, what
    assert x.tobytes() == y.tobytes(), f"{what}: {x} != {y}"


def _row_bits(s: dict[str, np.ndarray], k: int) -> dict[str, bytes]:
  return {name: np.ascontiguousarray(v[k]).tobytes() for name, v in s.items()}


def _layer(stacked, i):
  return jax.tree.map(lambda x: x[i], stacked)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _f32(x) -> np.float32:
  return np.float32(x)


# --------------------------------------------------------------------------------------------
# The independent oracle.


def _oracle_command(stage, ready, embargo_left, op, target, blueprint, strategy):
  """(accepted, destination) for one seed, from the design's edges and gates (docs/design.md,
  "Stages", "Lifecycle thresholds")."""
  if op == Op.GERMINATE:
    dst = G
  elif op == Op.ADVANCE:
    dst = target if target >= 0 else SUCCESS.get(stage)
  elif op == Op.CANCEL:
    dst = CA
  elif op == Op.CULL:
    dst = CU
  elif op == Op.ROLLBACK:
    dst = RB
  else:  # NONE and unknown opcodes
    return False, None
  if dst is None or (stage, dst) not in SPEC_EDGES:
    return False, dst
  if dst == G:  # germination only by GERMINATE, not embargoed, with known ids
    gate = (op == Op.GERMINATE and embargo_left <= 0 and 0 <= blueprint < NB
            and 0 <= strategy < NS)
  elif dst == SUCCESS.get(stage):  # success-path advance: the seed's ready flag
    gate = bool(ready)
  else:  # cancel / cull / rollback: Tamiyo's decision
    gate = True
  return gate, dst


def _oracle_ready(row: dict, delta, recon, repl) -> bool:
  s = int(row["stage"])
  d, r = _f32(delta), _f32(recon)
  improves = math.isfinite(d) and d > _f32(CFG.improvement_margin)
  recon_ok = math.isfinite(r) and r <= _f32(CFG.recon_tolerance)
  steps = int(row["steps_in_stage"])
  if s in (G, CA):
    return True
  if s == TR:
    return steps >= CFG.min_training_steps and (recon_ok if repl else improves)
  if s == GR:
    return float(row["alpha"]) >= 1.0
  if s == ST:
    return steps >= CFG.stabilization_steps
  if s == EV:
    return int(row["epochs_in_stage"]) >= 1 and improves
  if s == FT:
    return steps >= CFG.fine_tuning_steps and improves
  if s == CU:
    return int(row["embargo_left"]) <= 0
  return False


def _check_cmd(pre, post, accepted, args):
  op, target, bp, strat, epoch = args
  accepted = np.asarray(accepted)
  chex.assert_shape(accepted, (K,))
  assert accepted.dtype == np.bool_
  for k in range(K):
    row = {n: v[k] for n, v in pre.items()}
    exp_acc, dst = _oracle_command(int(row["stage"]), bool(row["ready"]),
                                   int(row["embargo_left"]), int(op[k]), int(target[k]),
                                   int(bp[k]), int(strat[k]))
    assert bool(accepted[k]) == exp_acc, (k, row["stage"], op[k], target[k], bp[k], strat[k])
    if not exp_acc:
      assert _row_bits(pre, k) == _row_bits(post, k), f"rejected seed {k} changed"
      continue
    assert int(post["stage"][k]) == dst
    assert (int(pre["stage"][k]), dst) in SPEC_EDGES
    assert post["steps_in_stage"][k] == 0 and post["epochs_in_stage"][k] == 0
    assert not post["ready"][k]
    assert post["pause_steps"][k] == 0
    assert post["alpha"][k] == (1.0 if dst in ALPHA_ONE else 0.0)
    if dst == G:
      assert post["blueprint"][k] == bp[k] and post["strategy"][k] == strat[k]
      assert post["germinated_epoch"][k] == epoch
      assert not post["stage_epochs"][k].any()
      assert post["lifecycle_steps"][k] == 0
    elif dst == D:
      assert post["blueprint"][k] == -1 and post["strategy"][k] == -1
      assert post["embargo_left"][k] == 0
    else:
      assert post["blueprint"][k] == pre["blueprint"][k]
      assert post["strategy"][k] == pre["strategy"][k]
    if dst == CU:
      assert post["embargo_left"][k] == CFG.embargo_epochs
    if dst == GR:
      assert post["objective_rate_ref"][k] == pre["objective_rate"][k]


def _check_ready(pre, post, args):
  delta, recon, repl = args
  for k in range(K):
    row = {n: v[k] for n, v in pre.items()}
    assert bool(post["ready"][k]) == _oracle_ready(row, delta[k], recon[k], repl[k]), (k, row)
    d, r = _f32(delta[k]), _f32(recon[k])
    exp_delta = d if math.isfinite(d) else pre["delta"][k]
    exp_recon = r if math.isfinite(r) else pre["recon_ratio"][k]
    assert post["delta"][k].tobytes() == np.float32(exp_delta).tobytes()
    assert post["recon_ratio"][k].tobytes() == np.float32(exp_recon).tobytes()
    bad = int(pre["bad_epochs"][k])
    if row["stage"] == FT and math.isfinite(d):
      bad = 0 if d > _f32(CFG.improvement_margin) else bad + 1
    assert post["bad_epochs"][k] == bad
    for name in ("stage", "alpha", "steps_in_stage", "epochs_in_stage", "embargo_left",
                 "blueprint", "strategy"):
      assert post[name][k] == pre[name][k]


def _check_tick_epoch(pre, post):
  np.testing.assert_array_equal(post["epochs_in_stage"], pre["epochs_in_stage"] + 1)
  exp_se = pre["stage_epochs"].copy()
  exp_se[np.arange(K), pre["stage"]] += 1
  np.testing.assert_array_equal(post["stage_epochs"], exp_se)
  culled = pre["stage"] == CU
  np.testing.assert_array_equal(
      post["embargo_left"],
      np.where(culled, np.maximum(pre["embargo_left"] - 1, 0), pre["embargo_left"]))
  np.testing.assert_array_equal(post["stage"], pre["stage"])
  np.testing.assert_array_equal(post["ready"], pre["ready"])


def _check_tick_step(pre, post):
  live = np.isin(pre["stage"], LIVE)
  np.testing.assert_array_equal(post["steps_in_stage"], pre["steps_in_stage"] + live)
  np.testing.assert_array_equal(post["lifecycle_steps"], pre["lifecycle_steps"] + live)
  for name in pre:
    if name not in ("steps_in_stage", "lifecycle_steps"):
      assert pre[name].tobytes() == post[name].tobytes(), name


def _check_invariants(pre, post):
  stage = post["stage"]
  assert stage.dtype == np.int32
  assert all(int(s) in REACHABLE for s in stage)
  for k in range(K):
    a, b = int(pre["stage"][k]), int(post["stage"][k])
    assert a == b or (a, b) in SPEC_EDGES, (a, b)
    if a in TERMINAL:
      assert b == a, "terminal stages absorb everything"
  assert np.all((post["alpha"] >= 0) & (post["alpha"] <= 1))
  assert np.all(np.isfinite(post["delta"]))
  assert not np.any(np.isnan(post["recon_ratio"]))
  assert np.all(post["embargo_left"] >= 0)
  dormant = stage == D
  assert np.all(post["blueprint"][dormant] == -1) and np.all(post["strategy"][dormant] == -1)
  # A seed that holds a child holds known ids.
  held = ~np.isin(stage, (D,))
  assert np.all((post["blueprint"][held] >= 0) & (post["blueprint"][held] < NB))
  assert np.all((post["strategy"][held] >= 0) & (post["strategy"][held] < NS))


def _run_sequence(steps, *, eager: bool = True):
  """Run `steps` on NL layers: eagerly (optional), jitted per layer and vmapped over the stack.

  Every result is checked against the oracle and all three paths are compared bit for bit.
  Returns the set of stages visited.
  """
  layers = [init_seed_state(K) for _ in range(NL)]
  jitted = list(layers)
  stacked = _stack(layers)
  visited = {D}
  for epoch, (kind, args) in enumerate(steps):
    per_layer = [tuple(np.asarray(a[i]) for a in args) for i in range(NL)]
    new_layers = []
    for i in range(NL):
      pre = _np_state(jitted[i])
      a = per_layer[i]
      out_j = JITTED[kind](jitted[i], *a)
      if eager:
        out_e = FUNCS[kind](layers[i], *a)
        _assert_bits_equal(out_e, out_j, f"eager vs jit, {kind}")
        layers[i] = out_e[0] if kind == "cmd" else out_e
      post_state = out_j[0] if kind == "cmd" else out_j
      post = _np_state(post_state)
      if kind == "cmd":
        _check_cmd(pre, post, out_j[1], a)
      elif kind == "ready":
        _check_ready(pre, post, a)
      elif kind == "epoch":
        _check_tick_epoch(pre, post)
      elif kind == "step":
        _check_tick_step(pre, post)
      _check_invariants(pre, post)
      visited.update(int(s) for s in post["stage"])
      new_layers.append(out_j)
    out_v = VMAPPED[kind](stacked, *(jnp.asarray(x) for x in args))
    for i in range(NL):
      _assert_bits_equal(_layer(out_v, i), new_layers[i], f"vmap vs per-layer, {kind}")
    stacked = out_v[0] if kind == "cmd" else out_v
    jitted = [o[0] if kind == "cmd" else o for o in new_layers]
  return visited


# --------------------------------------------------------------------------------------------
# Hypothesis strategies for random steps.

_ints = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=K, max_size=K)
_per_layer = lambda s: st.lists(s, min_size=NL, max_size=NL).map(np.asarray)
_ops = st.sampled_from([-1, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5, 6])
_targets = st.one_of(st.just(-1), st.integers(-1, 11))
_floats = st.one_of(st.floats(-1.0, 1.0, width=32, allow_subnormal=False), st.just(0.0),
                    st.sampled_from([math.nan, math.inf, -math.inf]))
_recons = st.one_of(st.floats(0.0, 0.25, width=32, allow_subnormal=False),
                    st.sampled_from([math.nan, math.inf]))

_cmd_step = st.tuples(
    st.just("cmd"),
    st.tuples(
        _per_layer(st.lists(_ops, min_size=K, max_size=K)),
        _per_layer(st.lists(_targets, min_size=K, max_size=K)),
        _per_layer(_ints(-1, NB)),
        _per_layer(_ints(-1, NS)),
        st.integers(0, 100).map(lambda e: np.full((NL,), e, np.int32)),
    ).map(lambda t: tuple(np.asarray(x, np.int32) for x in t)),
)
_ready_step = st.tuples(
    st.just("ready"),
    st.tuples(
        _per_layer(st.lists(_floats, min_size=K, max_size=K)).map(lambda x: x.astype(np.float32)),
        _per_layer(st.lists(_recons, min_size=K, max_size=K)).map(lambda x: x.astype(np.float32)),
        _per_layer(st.lists(st.booleans(), min_size=K, max_size=K)).map(lambda x: x.astype(bool)),
    ),
)
_step = st.one_of(
    _cmd_step,
    _ready_step,
    st.just(("epoch", ())),
    st.just(("step", ())),
    st.just(("ramp", ())),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=20))
def test_random_sequences_eager_jit_vmap_agree_and_obey_the_gates(steps):
  _run_sequence(steps)


def _random_steps(rng: np.random.Generator, n: int):
  """A biased random walk that pushes seeds down the success path (and off it)."""
  steps = []
  for _ in range(n):
    u = rng.random()
    if u < 0.35:
      op = rng.choice([0, 1, 2, 3, 4, 5, 6], size=(NL, K),
                      p=[0.1, 0.15, 0.64, 0.03, 0.03, 0.02, 0.03]).astype(np.int32)
      target = np.where(rng.random((NL, K)) < 0.8, -1,
                        rng.integers(-1, 12, (NL, K))).astype(np.int32)
      bp = rng.integers(-1, NB + 1, (NL, K)).astype(np.int32)
      strat = rng.integers(-1, NS + 1, (NL, K)).astype(np.int32)
      steps.append(("cmd", (op, target, bp, strat, np.full((NL,), len(steps), np.int32))))
    elif u < 0.55:
      delta = rng.normal(0.3, 0.5, (NL, K)).astype(np.float32)
      delta[rng.random((NL, K)) < 0.05] = np.nan
      recon = rng.uniform(0, 0.1, (NL, K)).astype(np.float32)
      repl = rng.random((NL, K)) < 0.5
      steps.append(("ready", (delta, recon, repl)))
    elif u < 0.7:
      steps.append(("epoch", ()))
    elif u < 0.9:
      steps.append(("step", ()))
    else:
      steps.append(("ramp", ()))
  return steps


def test_long_random_walk_visits_every_stage():
  # Jit and vmap only (the eager path is covered above); checks the deep stages are exercised.
  rng = np.random.default_rng(0)
  visited = set()
  for _ in range(2):
    visited |= _run_sequence(_random_steps(rng, 300), eager=False)
  assert visited == set(range(11)), sorted(set(range(11)) - visited)


# --------------------------------------------------------------------------------------------
# The transition table.


def test_stage_values_in_spec_order():
  assert [s.name for s in Stage] == list(SPEC_ORDER)
  assert [int(s) for s in Stage] == list(range(11))
  assert lifecycle.NUM_STAGES == 11


def test_transition_table_matches_spec_diagram_edge_by_edge():
  chex.assert_shape(LEGAL_TRANSITIONS, (11, 11))
  assert LEGAL_TRANSITIONS.dtype == np.bool_
  for src in range(11):
    for dst in range(11):
      assert bool(LEGAL_TRANSITIONS[src, dst]) == ((src, dst) in SPEC_EDGES), (
          f"{SPEC_ORDER[src]} -> {SPEC_ORDER[dst]}")
  assert int(LEGAL_TRANSITIONS.sum()) == len(SPEC_EDGES) == 19
  assert not LEGAL_TRANSITIONS[NOT_TAKEN]
  for t in TERMINAL:
    assert not LEGAL_TRANSITIONS[t].any(), f"{SPEC_ORDER[t]} must be terminal"
  assert not np.diag(LEGAL_TRANSITIONS).any()
  with pytest.raises(ValueError):
    LEGAL_TRANSITIONS[0, 0] = True  # read-only


def test_every_stage_reachable_and_is_reachable_agrees():
  assert REACHABLE == set(range(11))
  for s in Stage:
    assert lifecycle.is_reachable(s)


@pytest.mark.parametrize("src,dst", sorted(SPEC_EDGES))
def test_each_spec_edge_is_accepted_by_some_command(src, dst):
  """Each edge is taken by a command from a seed in `src` (ready where it needs to be)."""
  state = init_seed_state(1).replace(stage=jnp.array([src], jnp.int32),
                                     ready=jnp.array([True]),
                                     blueprint=jnp.array([0 if src != D else -1], jnp.int32),
                                     strategy=jnp.array([0 if src != D else -1], jnp.int32))
  op = {G: Op.GERMINATE, CA: Op.CANCEL, CU: Op.CULL, RB: Op.ROLLBACK}.get(dst, Op.ADVANCE)
  cmds = make_commands(1, op=op, target=dst if op == Op.ADVANCE else -1, blueprint=0, strategy=0)
  new, acc = apply_commands(state, cmds, CFG, num_blueprints=1, num_strategies=1)
  assert bool(acc[0])
  assert int(new.stage[0]) == dst


def test_every_non_edge_is_rejected():
  # One seed per (src, dst, op), all ready: no command ever takes a seed along a non-edge.
  combos = [(src, dst, int(op)) for src in range(11) for dst in range(11) for op in Op
            if (src, dst) not in SPEC_EDGES]
  src, dst, op = (np.array(c, np.int32) for c in zip(*combos))
  n = len(combos)
  state = init_seed_state(n).replace(stage=jnp.asarray(src), ready=jnp.ones((n,), bool))
  cmds = make_commands(n, op=op, target=dst, blueprint=0, strategy=0)
  new, acc = apply_commands(state, cmds, CFG, num_blueprints=1, num_strategies=1)
  new_stage = np.asarray(new.stage)
  assert not np.any(np.asarray(acc) & (new_stage == dst))
  assert np.all(new_stage[~np.asarray(acc)] == src[~np.asarray(acc)])
  for a, b in zip(src, new_stage):
    assert a == b or (int(a), int(b)) in SPEC_EDGES


# --------------------------------------------------------------------------------------------
# Scripted walks through the public API.


def _advance(state, seed=0):
  return apply_commands(state, make_commands(state.num_seeds,
                                             op=jnp.where(jnp.arange(state.num_seeds) == seed,
                                                          Op.ADVANCE, Op.NONE)),
                        CFG, num_blueprints=NB, num_strategies=NS)


def _walk_to(stage: int, k: int = 3) -> SeedState:
  """Seed 0 taken to `stage` along legal, gated transitions; other seeds DORMANT."""
  s, acc = request_germination(init_seed_state(k), 0, 1, 1, num_blueprints=NB,
                               num_strategies=NS, config=CFG, epoch=3)
  assert bool(acc[0])
  if stage == G:
    return s
  if stage == CA:
    s, acc = cancel_germination(s, 0, CFG)
    assert bool(acc[0])
    return s
  s = update_readiness(s, config=CFG)
  s, acc = _advance(s)
  assert bool(acc[0]) and int(s.stage[0]) == TR
  path = [(TR, GR), (GR, ST), (ST, EV), (EV, FT), (FT, FO)]
  for src, dst in path:
    if int(s.stage[0]) == stage:
      return s
    # Not ready yet: the advance is rejected and changes nothing.
    s = update_readiness(s, delta=-1.0, config=CFG)
    s2, acc = _advance(s)
    assert not bool(acc[0])
    _assert_bits_equal(s2, s)
    for _ in range(3):
      s = tick_step(s)
    s = tick_epoch(s)
    if src == GR:
      s = s.replace(alpha=s.alpha.at[0].set(1.0))
    s = update_readiness(s, delta=0.5, recon_ratio=0.01, config=CFG)
    assert bool(s.ready[0]), SPEC_ORDER[src]
    s, acc = _advance(s)
    assert bool(acc[0]) and int(s.stage[0]) == dst
  assert int(s.stage[0]) == stage
  return s


def test_success_path_walk_to_fossilized():
  s = _walk_to(FO)
  assert int(s.stage[0]) == FO and float(s.alpha[0]) == 1.0
  np.testing.assert_array_equal(np.asarray(s.stage[1:]), [D, D])


@pytest.mark.parametrize("terminal", TERMINAL)
def test_terminal_stages_absorb_everything(terminal):
  s = _walk_to(FO) if terminal == FO else _walk_to(TR)
  if terminal == RB:
    s, acc = apply_commands(s, make_commands(3, op=jnp.array([Op.ROLLBACK, 0, 0])), CFG,
                            num_blueprints=NB, num_strategies=NS)
    assert bool(acc[0]) and int(s.stage[0]) == RB
  s = s.replace(ready=jnp.ones((3,), bool))
  # Every command on copies of seed 0: op x target x blueprint.
  combos = [(op, t, bp) for op in list(map(int, Op)) + [7] for t in range(-1, 12)
            for bp in (-1, 0)]
  n = len(combos)
  copies = jax.tree.map(lambda x: jnp.repeat(x[:1], n, axis=0), s)
  op, target, bp = (np.array(c, np.int32) for c in zip(*combos))
  # Traced, so the unknown op 7 reaches the gate (concrete, make_commands refuses it).
  cmds = jax.jit(lambda o, t, b: make_commands(n, op=o, target=t, blueprint=b, strategy=0))(
      op, target, bp)
  new, acc = apply_commands(copies, cmds, CFG, num_blueprints=NB, num_strategies=NS)
  assert not np.asarray(acc).any()
  _assert_bits_equal(new, copies)
  for f in (tick_epoch, tick_step, lambda x: update_readiness(x, delta=1.0, config=CFG)):
    assert int(f(s).stage[0]) == terminal
  s2, acc = cancel_germination(s, 0)
  assert not bool(acc[0])
  s2, acc = request_germination(s, 0, 0, 0, num_blueprints=NB, num_strategies=NS)
  assert not bool(acc[0])


def test_culled_embargo_then_dormant_then_germinate():
  s = _walk_to(TR)
  s, acc = apply_commands(s, make_commands(3, op=jnp.array([Op.CULL, 0, 0])), CFG,
                          num_blueprints=NB, num_strategies=NS)
  assert bool(acc[0]) and int(s.stage[0]) == CU
  assert int(s.embargo_left[0]) == CFG.embargo_epochs
  for _ in range(CFG.embargo_epochs):
    s = update_readiness(s, config=CFG)
    assert not bool(s.ready[0])
    s2, acc = _advance(s)
    assert not bool(acc[0])
    s = tick_epoch(s)
  s = update_readiness(s, config=CFG)
  assert bool(s.ready[0])
  s, acc = _advance(s)
  assert bool(acc[0]) and int(s.stage[0]) == D
  assert int(s.blueprint[0]) == -1 and int(s.strategy[0]) == -1
  s, acc = request_germination(s, 0, 2, 0, num_blueprints=NB, num_strategies=NS)
  assert bool(acc[0]) and int(s.stage[0]) == G and int(s.blueprint[0]) == 2


# --------------------------------------------------------------------------------------------
# Germination and cancellation.


def test_germinate_rejected_under_embargo():
  s = init_seed_state(3).replace(embargo_left=jnp.array([1, 0, 2], jnp.int32))
  new, acc = request_germination(s, jnp.array([0, 1, 2]), 0, 0, num_blueprints=1,
                                 num_strategies=1)
  np.testing.assert_array_equal(np.asarray(acc), [False, True, False])
  np.testing.assert_array_equal(np.asarray(new.stage), [D, G, D])
  for k in (0, 2):
    _assert_bits_equal(_layer(new, k), _layer(s, k))


@pytest.mark.parametrize("bp,strat", [(-1, 0), (NB, 0), (0, -1), (0, NS), (100, 100)])
def test_germinate_rejected_for_unknown_ids(bp, strat):
  s = init_seed_state(2)
  # Concrete ids: the caller's mistake, named before tracing.
  name = "blueprint" if not 0 <= bp < NB else "strategy"
  bad = bp if name == "blueprint" else strat
  with pytest.raises(ValueError, match=f"^{name}: expected .* in \\[0, .*got {bad}"):
    request_germination(s, 0, bp, strat, num_blueprints=NB, num_strategies=NS)
  # Traced ids (a policy under jit): rejected by the gate, the state unchanged.
  germ = jax.jit(lambda s, b, g: request_germination(s, 0, b, g, num_blueprints=NB,
                                                     num_strategies=NS))
  new, acc = germ(s, jnp.int32(bp), jnp.int32(strat))
  assert not np.asarray(acc).any()
  _assert_bits_equal(new, s)


@pytest.mark.parametrize("kwargs,name,value", [
    (dict(op=99), "op", 99),
    (dict(op=jnp.array([0, 1, -1, 2])), "op", -1),
    (dict(op=Op.ADVANCE, target=11), "target", 11),
    (dict(op=Op.ADVANCE, target=-2), "target", -2),
    (dict(op=Op.GERMINATE, blueprint=-2, strategy=0), "blueprint", -2),
    (dict(op=Op.GERMINATE, blueprint=9, strategy=0, num_blueprints=5), "blueprint", 9),
    (dict(op=Op.GERMINATE, blueprint=0, strategy=np.array([0, 1, 7, 0]), num_strategies=4),
     "strategy", 7),
])
def test_make_commands_refuses_concrete_unknown_ids(kwargs, name, value):
  with pytest.raises(ValueError, match=f"^{name}: expected .*got {value}"):
    make_commands(4, **kwargs)
  # The same values traced are built, and every one is rejected by the gates.
  traced = {k: v for k, v in kwargs.items() if not k.startswith("num_")}
  sizes = {k: v for k, v in kwargs.items() if k.startswith("num_")}
  build = jax.jit(lambda t: make_commands(4, **t, **sizes))
  cmds = build({k: jnp.asarray(v, jnp.int32) for k, v in traced.items()})
  s = init_seed_state(4).replace(ready=jnp.ones((4,), bool))
  new, acc = apply_commands(s, cmds, CFG, num_blueprints=sizes.get("num_blueprints", NB),
                            num_strategies=sizes.get("num_strategies", NS))
  bad = np.asarray(getattr(cmds, name)) == value
  assert bad.any() and not np.asarray(acc)[bad].any()
  for k in np.nonzero(bad)[0]:
    _assert_bits_equal(_layer(new, int(k)), _layer(s, int(k)))


def test_germinate_twice_rejected():
  s, acc = request_germination(init_seed_state(2), 1, 0, 1, num_blueprints=NB,
                               num_strategies=NS, epoch=4)
  np.testing.assert_array_equal(np.asarray(acc), [False, True])
  assert int(s.germinated_epoch[1]) == 4
  s2, acc = request_germination(s, 1, 2, 0, num_blueprints=NB, num_strategies=NS, epoch=5)
  assert not np.asarray(acc).any()
  _assert_bits_equal(s2, s)


def test_germinate_only_by_germinate_op():
  s = init_seed_state(1).replace(ready=jnp.array([True]))
  for op in (Op.ADVANCE, Op.CANCEL, Op.CULL, Op.ROLLBACK, Op.NONE):
    new, acc = apply_commands(s, make_commands(1, op=op, target=G, blueprint=0, strategy=0),
                              CFG, num_blueprints=1, num_strategies=1)
    assert not bool(acc[0])
    _assert_bits_equal(new, s)


@pytest.mark.parametrize("seeds", [
    2,
    np.int32(2),
    jnp.array(2),
    jnp.array([0, 2]),
    np.array([2, 2, 0]),
    np.array([], np.int32),
    np.array([True, False, True, False]),
    jnp.array([False, False, False, False]),
])
def test_request_and_cancel_with_index_array_and_mask(seeds):
  expected = np.zeros(4, bool)
  arr = np.asarray(seeds)
  if arr.dtype == np.bool_:
    expected = arr.copy()
  else:
    expected[np.atleast_1d(arr).astype(int)] = True
  s0 = init_seed_state(4)
  s, acc = request_germination(s0, seeds, jnp.array([0, 1, 2, 0]), 1, num_blueprints=NB,
                               num_strategies=NS)
  np.testing.assert_array_equal(np.asarray(acc), expected)
  np.testing.assert_array_equal(np.asarray(s.stage), np.where(expected, G, D))
  np.testing.assert_array_equal(np.asarray(s.blueprint), np.where(expected, [0, 1, 2, 0], -1))
  np.testing.assert_array_equal(np.asarray(s.strategy), np.where(expected, 1, -1))
  # Cancel: accepted for the germinated seeds only (DORMANT seeds reject).
  s2, acc2 = cancel_germination(s, np.ones(4, bool))
  np.testing.assert_array_equal(np.asarray(acc2), expected)
  np.testing.assert_array_equal(np.asarray(s2.stage), np.where(expected, CA, D))
  s3, acc3 = cancel_germination(s, seeds)
  np.testing.assert_array_equal(np.asarray(acc3), expected)
  _assert_bits_equal(s3, s2)


def test_cancel_from_training_and_not_from_grafting():
  s = _walk_to(TR)
  s2, acc = cancel_germination(s, 0)
  assert bool(acc[0]) and int(s2.stage[0]) == CA
  s = _walk_to(GR)
  s2, acc = cancel_germination(s, [0])
  assert not bool(acc[0])
  _assert_bits_equal(s2, s)


def test_request_germination_under_jit_and_vmap():
  f = jax.jit(lambda s, m: request_germination(s, m, 0, 0, num_blueprints=1, num_strategies=1))
  s = init_seed_state(3)
  mask = jnp.array([True, False, True])
  _assert_bits_equal(f(s, mask), request_germination(s, mask, 0, 0, num_blueprints=1,
                                                     num_strategies=1))
  stacked = _stack([s, s])
  masks = jnp.array([[True, False, False], [False, True, True]])
  out = jax.vmap(f)(stacked, masks)
  for i in range(2):
    _assert_bits_equal(_layer(out, i), f(s, masks[i]))


# --------------------------------------------------------------------------------------------
# Argument errors name the argument.


@pytest.mark.parametrize("fn,exc,name", [
    (lambda: init_seed_state(-1), ValueError, "num_seeds"),
    (lambda: init_seed_state(0), ValueError, "num_seeds"),
    (lambda: init_seed_state(2.0), TypeError, "num_seeds"),
    (lambda: init_seed_state(True), TypeError, "num_seeds"),
    (lambda: no_commands(-3), ValueError, "num_seeds"),
    (lambda: LifecycleConfig(min_training_steps=-1), ValueError, "min_training_steps"),
    (lambda: LifecycleConfig(max_training_steps=2.5), TypeError, "max_training_steps"),
    (lambda: LifecycleConfig(stabilization_steps=-2), ValueError, "stabilization_steps"),
    (lambda: LifecycleConfig(fine_tuning_steps="5"), TypeError, "fine_tuning_steps"),
    (lambda: LifecycleConfig(fine_tuning_patience=-1), ValueError, "fine_tuning_patience"),
    (lambda: LifecycleConfig(embargo_epochs=-1), ValueError, "embargo_epochs"),
    (lambda: LifecycleConfig(recon_tolerance=-0.1), ValueError, "recon_tolerance"),
    (lambda: LifecycleConfig(recon_tolerance=math.nan), ValueError, "recon_tolerance"),
    (lambda: LifecycleConfig(improvement_margin=math.inf), ValueError, "improvement_margin"),
    (lambda: LifecycleConfig(improvement_margin="0"), TypeError, "improvement_margin"),
    (lambda: LifecycleConfig(training_margin=math.nan), ValueError, "training_margin"),
    (lambda: LifecycleConfig(training_margin="-1e-3"), TypeError, "training_margin"),
])
def test_constructor_argument_errors(fn, exc, name):
  with pytest.raises(exc, match=name):
    fn()


_S4 = init_seed_state(4)
_GERM = dict(num_blueprints=NB, num_strategies=NS)


@pytest.mark.parametrize("fn,exc,name", [
    (lambda: request_germination(_S4, 4, 0, 0, **_GERM), ValueError, "seeds"),
    (lambda: request_germination(_S4, -1, 0, 0, **_GERM), ValueError, "seeds"),
    (lambda: request_germination(_S4, [0, 9], 0, 0, **_GERM), ValueError, "seeds"),
    (lambda: request_germination(_S4, np.zeros((2, 2), np.int32), 0, 0, **_GERM),
     ValueError, "seeds"),
    (lambda: request_germination(_S4, np.ones(3, bool), 0, 0, **_GERM), ValueError, "seeds"),
    (lambda: request_germination(_S4, 1.0, 0, 0, **_GERM), TypeError, "seeds"),
    (lambda: request_germination(_S4, np.array([0.0, 1.0]), 0, 0, **_GERM), TypeError, "seeds"),
    (lambda: request_germination(_S4, 0, 0.5, 0, **_GERM), TypeError, "blueprint"),
    (lambda: request_germination(_S4, 0, 0, jnp.array([0.0]), **_GERM), TypeError, "strategy"),
    (lambda: request_germination(_S4, 0, jnp.array([0, 1, 2]), 0, **_GERM), ValueError,
     "blueprint"),
    (lambda: request_germination(_S4, 0, 0, np.zeros((4, 1), np.int32), **_GERM), ValueError,
     "strategy"),
    (lambda: request_germination(_S4, 0, 0, 0, num_blueprints=0, num_strategies=1),
     ValueError, "num_blueprints"),
    (lambda: request_germination(_S4, 0, 0, 0, num_blueprints=1, num_strategies=-2),
     ValueError, "num_strategies"),
    (lambda: request_germination(_S4, 0, 0, 0, num_blueprints=1.0, num_strategies=1),
     TypeError, "num_blueprints"),
    (lambda: request_germination("state", 0, 0, 0, **_GERM), TypeError, "state"),
    (lambda: cancel_germination(_S4, 4), ValueError, "seeds"),
    (lambda: cancel_germination(_S4, np.ones(5, bool)), ValueError, "seeds"),
    (lambda: cancel_germination(_S4, np.array([0.5])), TypeError, "seeds"),
    (lambda: cancel_germination(_stack([_S4, _S4]), 0), ValueError, "state"),
    (lambda: apply_commands(_S4, no_commands(3), **_GERM), ValueError, "commands.op"),
    (lambda: apply_commands(_S4, no_commands(4).replace(target=jnp.zeros(4)), **_GERM),
     TypeError, "commands.target"),
    (lambda: apply_commands(_S4, no_commands(4).replace(blueprint=jnp.zeros((4, 1), jnp.int32)),
                            **_GERM), ValueError, "commands.blueprint"),
    (lambda: apply_commands(_S4, "cmds", **_GERM), TypeError, "commands"),
    (lambda: apply_commands(_stack([_S4, _S4]), no_commands(4), **_GERM), ValueError, "state"),
    (lambda: make_commands(4, op=jnp.zeros(3, jnp.int32)), ValueError, "op"),
    (lambda: make_commands(4, target=1.5), TypeError, "target"),
    (lambda: update_readiness(_S4, delta=jnp.zeros(3)), ValueError, "delta"),
    (lambda: update_readiness(_S4, recon_ratio=jnp.zeros((4, 2))), ValueError, "recon_ratio"),
    (lambda: update_readiness(_S4, is_replacement=np.ones(5, bool)), ValueError,
     "is_replacement"),
    (lambda: update_readiness(None), TypeError, "state"),
])
def test_call_argument_errors(fn, exc, name):
  with pytest.raises(exc, match=name):
    fn()


def test_init_seed_state_shapes_and_dtypes():
  s = init_seed_state(5)
  assert s.num_seeds == 5
  for name, leaf in vars(s).items():
    assert leaf.shape[0] == 5, name
  chex.assert_shape(s.stage_epochs, (5, 11))
  chex.assert_type([s.stage, s.blueprint, s.strategy, s.steps_in_stage], int)
  chex.assert_type([s.alpha, s.objective, s.delta], float)
  assert s.ready.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(s.stage), np.zeros(5))
  np.testing.assert_array_equal(np.asarray(s.blueprint), -np.ones(5))


def test_update_readiness_missing_delta_is_no_verdict():
  """NaN delta (seed not judged): no ready flag, no bad epoch, and the seed is marked
  `unjudged`; a measured non-improving delta counts as a bad epoch and is judged."""
  s = lifecycle.init_seed_state(4).replace(
      stage=jnp.array([Stage.EVALUATING, Stage.FINE_TUNING, Stage.TRAINING, Stage.FINE_TUNING],
                      jnp.int32),
      epochs_in_stage=jnp.full((4,), 2, jnp.int32),
      steps_in_stage=jnp.full((4,), 10_000, jnp.int32),
      bad_epochs=jnp.array([0, 1, 0, 1], jnp.int32))
  out = lifecycle.update_readiness(s, delta=jnp.array([jnp.nan, jnp.nan, jnp.nan, -1.0]))
  np.testing.assert_array_equal(np.asarray(out.ready), [False] * 4)
  np.testing.assert_array_equal(np.asarray(out.bad_epochs), [0, 1, 0, 2])
  np.testing.assert_array_equal(np.asarray(out.unjudged), [True, True, True, False])


@pytest.mark.parametrize("fn,name,form", [
    (lambda: request_germination(_S4, 0, "residual_mlp", 0, **_GERM), "blueprint",
     "catalog.names.index"),
    (lambda: request_germination(_S4, [0, 1], ["a", "b"], 0, **_GERM), "blueprint",
     "blueprint id"),
    (lambda: request_germination(_S4, 0, 0, "fixed_ramp", **_GERM), "strategy",
     "GraftingStrategy"),
    (lambda: request_germination(_S4, "first", 0, 0, **_GERM), "seeds", "seed index"),
    (lambda: request_germination(_S4, 0, 0, 0, epoch="3", **_GERM), "epoch", "int epoch"),
    (lambda: cancel_germination(_S4, "0"), "seeds", "seed index"),
    (lambda: make_commands(4, op="GERMINATE"), "op", "lifecycle.Op"),
    (lambda: make_commands(4, target="TRAINING"), "target", "lifecycle.Stage"),
    (lambda: make_commands(4, blueprint=b"x"), "blueprint", "blueprint id"),
    (lambda: apply_commands(_S4, no_commands(4), epoch="1", **_GERM), "epoch", "int epoch"),
])
def test_names_where_ids_belong_raise_a_type_error_naming_the_argument(fn, name, form):
  # Not JAX's dtype error: the argument and the form it takes are named, before tracing.
  with pytest.raises(TypeError, match=f"^{name}: expected .*{form}") as info:
    fn()
  assert "JAX array type" not in str(info.value)


def test_training_margin_gates_training_only():
  """`training_margin` opens TRAINING's gate for a child whose isolated delta does not hurt
  by more than it (a delta of 0: grafting it changes nothing); EVALUATING and FINE_TUNING keep
  `improvement_margin`. Unset, TRAINING uses `improvement_margin` too."""
  stage = jnp.array([Stage.TRAINING, Stage.TRAINING, Stage.EVALUATING, Stage.FINE_TUNING],
                    jnp.int32)
  state = init_seed_state(4).replace(
      stage=stage, steps_in_stage=jnp.full((4,), 1000, jnp.int32),
      epochs_in_stage=jnp.full((4,), 3, jnp.int32))
  delta = jnp.array([0.0, -2e-3, 0.0, 0.0])
  strict = update_readiness(state, delta=delta, config=LifecycleConfig())
  np.testing.assert_array_equal(np.asarray(strict.ready), [False, False, False, False])
  lenient = update_readiness(state, delta=delta,
                             config=LifecycleConfig(training_margin=-1e-3))
  np.testing.assert_array_equal(np.asarray(lenient.ready), [True, False, False, False])
  # A replacement child is gated by its reconstruction, whatever the margin.
  repl = update_readiness(state, delta=delta, recon_ratio=jnp.ones((4,)),
                          is_replacement=jnp.ones((4,), bool),
                          config=LifecycleConfig(training_margin=-1e-3))
  assert not bool(repl.ready[0])

"""Tamiyo: the stateless controller that decides, at every epoch end, what the seeds do next.

One concept per module: `config` (the knobs), `reports` (what Tamiyo sees), `state` (its
memory), `policy` (`decide`, in named steps), `bandit` (field reports and what they teach),
`records` (field reports as JSON), `learned` (a learned policy with `decide`'s contract:
`learned.policy(learned.load_pretrained())`). Everything public is re-exported here.

`decide(report, seeds, ctrl, config) -> (commands, ctrl)` is a pure, jittable policy over the
seed states of every Kasmina layer of a model (any pytree of `SeedState`, e.g. a dict keyed by
layer name). All of its memory lives in `ControllerState`; the config is static (hashable).
Everything here only *emits commands*: `lifecycle.apply_commands` keeps the gates, so Tamiyo
never bypasses one (docs/design.md, "Who decides what").

The training loop's end-of-epoch order:

  health reports + validation counterfactual per seed -> lifecycle.tick_epoch
  -> lifecycle.update_readiness -> tamiyo.decide -> lifecycle.apply_commands
  -> tamiyo.field_reports(old, new, report, ctrl) -> tamiyo.observe

If `ctrl.rollback_requested` is set after `decide`, the loop restores its last good checkpoint,
applies `rollback_commands(restored_seeds)` (in-flight seeds ROLLED_BACK, queued ones CANCELLED)
and emits their field reports, so the restore does not erase them (docs/design.md, "Rollback").

What `decide` does, in this order of precedence per seed (one command per seed):

1. Emergency rollback (whole model): the epoch's mean training loss is non-finite or larger than
   `rollback_factor` x the median of the last `rollback_window` epochs' (finite, kept) training
   losses, or a FOSSILIZED seed's child went non-finite (its child is frozen, so only a restore
   can undo it). Then every seed in TRAINING ... FINE_TUNING gets ROLLBACK, every GERMINATED seed
   CANCEL, nothing else happens and `ctrl.rollback_requested` is set. The epoch's losses do not
   enter the history.
2. One bad seed: a seed whose `health.nonfinite` (or `SeedState.nonfinite`) is set is rolled back
   (TRAINING ... FINE_TUNING) or cancelled (GERMINATED).
3. Culls: TRAINING seeds not `ready` after `lifecycle.max_training_steps` steps in the stage;
   EVALUATING seeds after >= 1 epoch in the stage that are not `ready` (their last counterfactual
   `delta <= improvement_margin`: harmful or useless); FINE_TUNING seeds with `bad_epochs >=
   lifecycle.fine_tuning_patience`. A seed whose counterfactual was not measured this epoch
   (`SeedState.unjudged`: left out by the loop's `max_judged`) is never culled (nor cancelled
   by recovery) on that missing measurement; it keeps its stage until it is judged.
4. Recovery: a GERMINATED seed, or a TRAINING seed that is not `ready`, whose chunk's need score
   (below) fell by at least `recovery_margin` since its germination is cancelled: the host fixed
   that chunk itself. (A `ready` TRAINING seed has shown a positive counterfactual and goes on.)
5. Success path: every `ready` seed in TRAINING, GRAFTING, STABILIZATION, EVALUATING,
   FINE_TUNING, CULLED or CANCELLED advances (ADVANCE to the next stage); GERMINATED seeds are
   promoted to TRAINING, oldest germination first (then highest need, then lowest index), while
   fewer than `max_concurrent_training` seeds of *that layer* are training (slots are per layer,
   docs/design.md, "Lifecycle thresholds"; slots freed this epoch are reused at once).
6. Germination: when the validation loss has plateaued (`plateau_patience` epochs in a row
   without improving the best by more than `plateau_min_delta`; or always when
   `germinate_without_plateau`) and the cooldown clock is out, the DORMANT, non-embargoed seeds
   with the highest need score (at least `min_need`) are germinated, at most
   `max_germinations_per_epoch` over the whole model and at most `max_queued_per_layer` seeds
   waiting in GERMINATED per layer. After a germinating epoch no seed germinates for
   `germination_cooldown_epochs` epochs. A layer stops growing for good once
   `growth_patience` of its children in a row did not pay (culled, rolled back, or fossilized
   with a validation counterfactual `delta <= pay_margin`; `observe` keeps the count): the
   grown size is found, not told.

The need score of a seed is a weighted mean of three numbers in [0, 1] from its health report:
`stuck = clip(1 - v / mean_layer(v), 0, 1)` with `v` the chunk variance (a chunk far below its
layer's mean variance is not carrying signal), the dead-node ratio, and the average inter-node
correlation (redundant nodes); weights `variance_weight`, `dead_weight`, `correlation_weight`.
Non-finite health values count 0.

Decisions do not flip on float noise (docs/design.md, "Decision tolerance"), see `tolerance`: every
ranking (need scores, blueprint and strategy scores) ties scores within a relative tolerance
of each other and breaks ties by index, lower first; every threshold (`min_need`, recovery,
the plateau's `plateau_min_delta`, the grafting trends, the emergency factor, `pay_margin`)
counts a value within the tolerance of it on one fixed side.

What to grow: every germinated seed gets the blueprint maximising

  strategy_score[b] + signature_weight * affinity[seed, b] - cost_weight * cost[b]

over its layer's catalog (ties: the lowest id). `cost[b]` is the mean of the blueprint's
parameter count and FLOPs per row, each divided by the catalog's largest; `capacity[b]` is the
parameter count divided by the largest. `affinity` matches the health signature to the child:

  dead * (residual * (capacity + parallel) / 2)           dead nodes: a residual MLP-like child
                                                           (parallel wiring revives a dead chunk)
  + correlation * max(replacement, parallel)              redundant chunk: a replacement
                                                           bottleneck or fresh parallel features
  + noise * (chunk-wired residual * (1 - capacity / 2))   noisy chunk (`noise = clip(v / mean -
                                                           1, 0, 1)`): a small chunk-wired child

`strategy_score` by `selection` (statistics per layer and blueprint, fed by `observe`; `n`
reports counted, `N` their sum over the layer's blueprints, `mean` the mean reward, `fail` the
culls and rollbacks, `tries` the germinations):

  PERFORMANCE  UCB: mean + ucb_c * sqrt(log(N + 1) / (n + 1))
  STABILITY    mean - fail / (n + 1) - cost - replacement   (cheap, residual, rarely failing)
  ACCURACY     capacity + mean                               (the biggest child)
  RISK         mean - 2 * fail / (n + 1)                     (avoid what got culled / rolled back)
  NOVELTY      1 / (1 + tries)                               (the least tried)

How to graft (one strategy for every seed germinated in an epoch, from the host's trend over
the last `trend_window` epochs, this one included): mean relative weight drift above
`drift_threshold` -> DRIFT_CONTROLLED; else mean host gradient norm outside
`[grad_norm_lower, grad_norm_upper]` -> GRAD_NORM_GATED (non-finite values are left out of
the means); else validation loss
falling by more than `fast_improvement` (relative) since the last epoch -> PERFORMANCE_LINKED;
else FIXED_RAMP. That pick is found by name among the layer's own grafting strategies (given
to the layer at construction, `LayerReport.strategy_names`); a layer without it, or every layer
under `grafting_selection="bandit"`, takes the strategy with the best UCB score over its field
reports (`ucb_c`; untried first). `grafting_strategy` (an id or a name) overrides the choice.

`observe` feeds the bandit with every field report but CANCELLED ones (a cancel says the chunk
recovered, nothing about the blueprint): reward `reward_fossilized` / `reward_culled` /
`reward_rolled_back` plus `delta_reward_weight * tanh(delta / delta_reward_scale)`."""

from kasmina_jax.tamiyo.config import FIXED_RAMP, PERFORMANCE_LINKED, DRIFT_CONTROLLED, GRAD_NORM_GATED, NUM_GRAFTING_STRATEGIES, GRAFTING_STRATEGY_NAMES, GRAFTING_SELECTIONS, HEALTH_FIELDS, REPORTED_STAGES, SelectionStrategy, TamiyoConfig, _check_config  # noqa: F401
from kasmina_jax.tamiyo.reports import LayerReport, layer_report, EpochReport, _check_health, _finite_or, _health_matrix  # noqa: F401
from kasmina_jax.tamiyo.state import LayerControllerState, ControllerState, _is_seed_state, _flatten_layers, _up_to, init_controller, _check_layer  # noqa: F401
from kasmina_jax.tamiyo.policy import _signature, need_score, _recent, _masked_median, _masked_mean, _grafting_choice, _fixed_strategy, _strategy_scores, _layer_strategy, _blueprint_scores, rollback_commands, decide, _layer_commands  # noqa: F401
from kasmina_jax.tamiyo.bandit import FieldReports, field_reports, observe, blueprint_statistics, strategy_statistics  # noqa: F401
from kasmina_jax.tamiyo.records import layer_name, _path_name, _float_or_none, _names_for, _lookup, to_records  # noqa: F401
from kasmina_jax.tamiyo import learned  # noqa: F401
from kasmina_jax.tamiyo.learned import LearnedPolicy, PolicyParams  # noqa: F401

__all__ = [
    "FIXED_RAMP",
    "PERFORMANCE_LINKED",
    "DRIFT_CONTROLLED",
    "GRAD_NORM_GATED",
    "NUM_GRAFTING_STRATEGIES",
    "GRAFTING_STRATEGY_NAMES",
    "GRAFTING_SELECTIONS",
    "HEALTH_FIELDS",
    "REPORTED_STAGES",
    "SelectionStrategy",
    "TamiyoConfig",
    "LayerReport",
    "layer_report",
    "EpochReport",
    "LayerControllerState",
    "ControllerState",
    "init_controller",
    "need_score",
    "rollback_commands",
    "decide",
    "FieldReports",
    "field_reports",
    "observe",
    "blueprint_statistics",
    "strategy_statistics",
    "layer_name",
    "to_records",
    "learned",
    "LearnedPolicy",
    "PolicyParams",
]

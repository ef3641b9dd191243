"""Training: the jitted train step, the end-of-epoch transition and a small `fit` loop.

One import for all of it; the code lives in three modules, one concept each:

- `kasmina_jax.steps`: the train state (`TrainConfig`, `TrainState`, `create_train_state`)
  and the pure, jitted functions (`train_step`, `evaluate`, `counterfactual_deltas`,
  `epoch_transition`, `apply_rollback`, `rollback_in_place`);
- `kasmina_jax.loop`: the Python loop around them (`fit`, `fit_loop`, `end_of_epoch`,
  `finish_epoch`, the history, the event log, the progress bar, `NonFiniteTrainingError`),
  with `fit`'s data checks in `kasmina_jax.data_checks`;
- `kasmina_jax.losses`: loss functions (`LossFn`, `cross_entropy_loss`).

Per step (`train_step`): task loss + the TRAINING seeds' objectives, one optimizer update
masked by stage (`kasmina_jax.optim`), telemetry accumulation (inside the layers), per-seed
alpha updates from the layers' grafting strategies, host drift and gradient norms. Per epoch
(`epoch_transition`): validation "as is", the per-seed counterfactual `delta`, health
reports, Tamiyo's decision and its commit, field reports (`orchestration.epoch_end`).
`end_of_epoch` adds the emergency rollback and the event log; `fit` loops over epochs
(`fit_loop`, which `distributed.fit` shares).
"""

# pylint: disable=unused-import
from kasmina_jax.losses import LossFn, cross_entropy_loss
from kasmina_jax.steps import (
    JUDGED_STAGES, EpochOutput, EpochStats, TrainConfig, TrainState, _is_child, _wrapped_optimizer,
    _zero_stats, apply_rollback, child_grad_norms, counterfactual_deltas, create_train_state,
    epoch_transition, evaluate, host_drift, host_grad_norm, host_only, layer_host_drift,
    layer_name, new_train_state, refresh_liveness, rollback_in_place, seeds_tree, train_step,
    wrapped_host_path)
from kasmina_jax.loop import (
    NonFiniteTrainingError, PlainProgress, _batches, _stage_names, check_fit_args, end_of_epoch,
    epoch_record, field_report_records, finish_epoch, fit, fit_loop, log_epoch, param_counts,
    progress_bar)

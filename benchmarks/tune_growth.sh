#!/usr/bin/env bash
# Tuning Tamiyo's defaults on VALIDATION only (--val-only: the test split is never read):
# several controller / lifecycle settings for the grown variant side by side, on the device
# host's CPUs. Usage: OUT=dir bash benchmarks/tune_growth.sh
set -u
out=${OUT:-runs/tune}
mkdir -p "$out"
W=${W:-6}
ALL='"germinate_without_plateau": true, "max_concurrent_training": 4, "max_germinations_per_epoch": 8, "max_queued_per_layer": 4, "germination_cooldown_epochs": 0, "selection": 2'
run() {  # tag, tasks, variants, lrs, seeds, controller, life
  python3 benchmarks/growth.py --tasks "$2" --variants "$3" --lrs "$4" --seeds "$5" --val-only \
    --no-plots --results "$out" --workers "$W" --tag "_$1" --out "$out/$1" \
    --controller "{$6}" --life "{$7}" > "$out/$1.log" 2>&1 &
}
run c3 mnist1d grown 3e-3,1e-2 3 "$ALL" ""
run c4 mnist1d grown 3e-3,1e-2 3 "$ALL" '"improvement_margin": -0.002'
run c5 mnist1d grown 3e-3,1e-2 3 "$ALL" '"improvement_margin": -0.005'
run s4 spirals fixed_small,fixed_large,ceiling,grown 3e-3,1e-2,3e-2 3 "$ALL" '"improvement_margin": -0.002'
run l4 char_lm fixed_small,fixed_large,ceiling,grown 3e-3 2 "$ALL" '"improvement_margin": -0.002'
wait
grep -h -A9 "^### " "$out"/*.log

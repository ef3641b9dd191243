#!/bin/bash
# The fused layer's GPU suite in one device call (see benchmarks/RESULTS.md, issue 18):
#   1. tune_triton.py: the forward tilings (small, per-node) with every seed blending and
#      with a tenth blending (training's usual case);
#   2. bench_layer.py with the winners (--triton-configs), 64 seeds with torch.compile and
#      the probe kernel, then 512, 16 and per-node;
#   3. ncu of the forward at the tuned f32 tiling (f32 and bf16 activations), memory
#      preallocation off so ncu's kernel replay saves little.
# About 560 s at most (each step has its own timeout); at most 8 files under $OUT (the device
# tool's limit). Usage, on the device:
#   source benchmarks/device_env.sh && bash benchmarks/layer_suite.sh
set -u
OUT=${OUT:-benchmarks/out}
F='grep --line-buffered -v -e ^W1 -e ^I1 -e Warning -e ^E1.*triton_heuristics'
mkdir -p "$OUT/t1" "$OUT/t2" "$OUT/a" "$OUT/b"
nvidia-smi --query-gpu=name --format=csv,noheader
T="python3 benchmarks/tune_triton.py"
( timeout 120 $T --classes small,node --kinds fwd --dtypes f32,bf16 --out "$OUT/t1"
  timeout 60 $T --classes small --kinds fwd --dtypes f32,bf16 --active 0.1 --out "$OUT/t2"
) 2>&1 | $F | grep --line-buffered -e BEST -e FAIL -e small -e node | tee "$OUT/tune.log"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
best = {}
for sub in ("t1", "t2"):  # t2 (a tenth blending) wins where both ran: training's usual case
  path = os.path.join(out, sub, "tune_triton_best.json")
  if os.path.exists(path):
    best.update(json.load(open(path)))
json.dump(best, open(os.path.join(out, "tuned.json"), "w"), indent=1)
print("tuned:", json.dumps(best))
PY
B="python3 benchmarks/bench_layer.py --dims 4096 --modes fwd,fwdbwd --triton-configs $OUT/tuned.json"
timeout 170 $B --dtypes f32,bf16 --seeds 64 --active 1,0.1,0 \
  --impls copy,jax_x2,reference,triton,probe,torch_compile --time-budget 155 --out "$OUT/a" \
  2>&1 | $F | tee "$OUT/bench_a.log"
timeout 130 $B --dtypes f32,bf16 --seeds 512,16,node --active 1 \
  --impls copy,reference,triton,probe --time-budget 115 --out "$OUT/b" 2>&1 | $F | tee "$OUT/bench_b.log"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 80 ncu --clock-control none \
  --kernel-name regex:fwd_coarse --launch-count 4 \
  --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 benchmarks/tune_triton.py --classes small --kinds fwd --dtypes f32,bf16 --plain-calls 1 \
  --configs "[$(python3 -c "import json;print(json.dumps(json.load(open('$OUT/tuned.json')).get('fwd/small/float32',{'BR':32,'TILES':16,'num_warps':2,'num_stages':2,'ACC2D':1})))")]" \
  > "$OUT/ncu_fwd.txt" 2>&1
rm -rf "$OUT/t1" "$OUT/t2" "$OUT"/a/*.md "$OUT"/b/*.md
ls -R "$OUT"

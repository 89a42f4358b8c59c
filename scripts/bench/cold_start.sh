#!/usr/bin/env bash
# Cold start on one GPU: launch -> first optimizer step at experiment=small_gpu for each `compile` setting,
# cold (empty Inductor and Triton caches) and then warm (the same caches again), with the steady tokens/s of
# the same run; then the training-step benchmark with both peers in one invocation.
#
#   DATA_ROOT=/path/to/gutenberg bash scripts/bench/cold_start.sh          # from the repository root
#   CONFIGS="regional:reduce-overhead full:reduce-overhead" BENCH=0 STEPS=60 OUT=/tmp/cold_start \
#     bash scripts/bench/cold_start.sh [train.py override ...]
#   CONFIGS= BENCH=1 bash scripts/bench/cold_start.sh                       # the benchmark only
#
# CONFIGS: the `compile` values to time (default: small_gpu's regional:reduce-overhead, regional compilation
# under whole-model CUDA graphs, and full:reduce-overhead, the whole model compiled as one graph). One call of the
# device tool runs at most 10 minutes: a cold full compile took 40-60 s, a run of 60 steps with its teardown and
# last checkpoint ~1.5 min more, so split the settings (and the benchmark) over calls as above.
# DATA_ROOT holds gutenberg_classics_train.txt.gz and gutenberg_classics_valid.txt. Prepared tokens go to
# PROJECT_ROOT/.cache (default /tmp/dsm), prepared once by an untimed eager run, so no timed run pays for data
# preparation. The timed runs keep what a user gets (the validation before fit included; it runs uncompiled) and
# no checkpoint callback, but a run still writes its final last.ckpt (5.6 GB at `small`): each run's checkpoints
# are deleted once reported. On an image without Python bytecode (PYTHONDONTWRITEBYTECODE set, packages installed
# without .pyc: ~6 s of every start on the H200 image) compile it once first, as a pip install would:
# `PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q <site-packages>` and export PYTHONPYCACHEPREFIX. Extra arguments go to every
# train.py run. The benchmark needs torchtitan for tt_deepseek_v3 (`bash ../shared/device/wheels.sh .whl
# peers`); without it that variant reports its import error and the others still run.
# EXPERIMENT (default small_gpu) picks the experiment config; BENCH_TIMEOUT caps each benchmark variant;
# BENCH_VARIANTS replaces the benchmark's list (ours@reduce-overhead@regional: small_gpu's setting; ours@default@regional:
# regional compilation without CUDA graphs).
set -euo pipefail
: "${DATA_ROOT:?set DATA_ROOT to the folder with the Gutenberg files}"
export DATA_ROOT
export PROJECT_ROOT=${PROJECT_ROOT:-/tmp/dsm}
STEPS=${STEPS:-60}
EXPERIMENT=${EXPERIMENT:-small_gpu}
CONFIGS=${CONFIGS-regional:reduce-overhead full:reduce-overhead}
MODE=${MODE:-reduce-overhead}   # the benchmark's torch.compile mode for ours (small_gpu's)
OUT=${OUT:-/tmp/cold_start}
BENCH=${BENCH:-1}
mkdir -p "$OUT" "$PROJECT_ROOT"
: > "$OUT/summary.txt"
common=("experiment=$EXPERIMENT" "trainer.max_steps=$STEPS" logger=csv callbacks.model_checkpoint=null "$@")

report() {  # results.json -> one line
  python - "$1" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
f = lambda k: "n/a" if r.get(k) is None else f"{r[k]:.1f}"
stages = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("startup_sec") or {}).items())
print(f"{sys.argv[2]:<36} first step {f('time_to_first_step_sec')} s from launch ({stages + ', ' if stages else ''}"
      f"fit {f('fit_to_first_step_sec')} s, compiling {f('compile_time_sec')} s)  "
      f"steady {r.get('tokens_per_sec') or 0:,.0f} tokens/s  "
      f"peak {r.get('peak_gpu_memory_gib')} GiB  wall {f('wall_time_sec')} s")
EOF
}

if [ -n "$CONFIGS" ]; then
  echo "== data preparation (untimed)"
  python train.py "experiment=$EXPERIMENT" trainer.max_steps=1 compile=false val_before_fit=false logger=none \
    callbacks.model_checkpoint=null "hydra.run.dir=$OUT/prep" "$@" > "$OUT/prep.log" 2>&1 \
    || { tail -20 "$OUT/prep.log"; exit 1; }
fi

for setting in $CONFIGS; do
  caches=$(mktemp -d /tmp/compile_cache.XXXXXX)  # fresh: nothing compiled yet
  for temp in cold warm; do
    run="$OUT/${setting//:/_}_${temp}"
    rm -rf "$run"
    TORCHINDUCTOR_CACHE_DIR="$caches/inductor" TRITON_CACHE_DIR="$caches/triton" \
      python train.py "${common[@]}" "compile=$setting" "hydra.run.dir=$run" > "$run.log" 2>&1 \
      || { echo "compile=$setting $temp failed:" | tee -a "$OUT/summary.txt"; tail -30 "$run.log"; continue; }
    report "$run" "compile=$setting $temp" | tee -a "$OUT/summary.txt"
    rm -rf "$run/checkpoints"
  done
  rm -rf "$caches"
done

if [ "$BENCH" = 1 ]; then
  echo "== training step, one invocation (ours full and regional, ours_dense, transformers, torchtitan)"
  python scripts/bench/bench_train.py \
    --variants "${BENCH_VARIANTS:-ours,ours@regional,ours_dense,hf_grouped_bf16_compile,tt_deepseek_v3}" --compile-mode "$MODE" \
    --data "$DATA_ROOT/gutenberg_classics_train.txt.gz" --val-data "$DATA_ROOT/gutenberg_classics_valid.txt" \
    --cache-dir "$PROJECT_ROOT/.cache/deepseek_mini" --timeout "${BENCH_TIMEOUT:-500}" --out "$OUT/bench_train.json" \
    | tee "$OUT/bench_train.txt"
fi
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# session 2026-11-30i, call 3 on one H200 (issue 23): the embedding compiled as a region too; the CUDA test; the
# training-step benchmark full:reduce-overhead vs regional:reduce-overhead in one invocation, profiled; the cold
# and warm start of regional:reduce-overhead (150 steps). Only small files under $OUT (no archive).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/c3; mkdir -p $R /tmp/dsm
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k "cuda" > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log)"
timeout 230 python scripts/bench/bench_train.py --variants ours,ours@reduce-overhead@regional --compile-mode reduce-overhead \
  --profile-steps 5 --timeout 180 --cache-dir /tmp/dsm/.cache/deepseek_mini --out $R/bench_train.json > $R/bench_train.txt 2>&1
echo "bench rc $? after $(( $(date +%s) - T0 )) s"; grep "^| ours" $R/bench_train.txt
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
[ -d /tmp/dsm/.cache/deepseek_mini/tokens ] || timeout 100 python train.py $common trainer.max_steps=1 compile=false val_before_fit=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
C=$(mktemp -d)
for temp in cold warm; do
  d=/tmp/runs/$temp
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 120 python train.py $common compile=regional:reduce-overhead hydra.run.dir=$d > $R/$temp.log 2>&1
  echo "$temp rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${temp}_results.json; cp $d/train.log $R/${temp}_train.log; rm -rf $d
  python - $R/${temp}_results.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("time_to_first_step_sec", "fit_to_first_step_sec", "compile_time_sec", "tokens_per_sec", "peak_gpu_memory_gib", "val_loss", "wall_time_sec")
print({k: r.get(k) for k in keys if k in r})
PY
done
echo "total $(( $(date +%s) - T0 )) s"

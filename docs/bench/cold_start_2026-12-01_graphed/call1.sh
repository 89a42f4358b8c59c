#!/usr/bin/env bash
# session 2026-11-30i, call 1 on one H200 (issue 23): compile=regional:reduce-overhead (regional compile under
# whole-model CUDA graphs, training/compile.GraphedRegional) against compile=full:reduce-overhead: the CUDA test,
# then cold and warm runs of each (first step from launch, steady tokens/s over 150 steps, val loss).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/c1; mkdir -p $R /tmp/dsm
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k "cuda" > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log)"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
timeout 100 python train.py $common trainer.max_steps=1 compile=false val_before_fit=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"
rm -rf /tmp/prep
for setting in regional:reduce-overhead full:reduce-overhead; do
  C=$(mktemp -d)
  for temp in cold warm; do
    d=$R/${setting//:/_}_$temp
    TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 170 python train.py $common compile=$setting hydra.run.dir=$d > $d.log 2>&1
    echo "$setting $temp rc $? after $(( $(date +%s) - T0 )) s"
    rm -rf $d/checkpoints
    python - $d <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
keys = ("time_to_first_step_sec", "fit_to_first_step_sec", "compile_time_sec", "tokens_per_sec", "peak_gpu_memory_gib", "val_loss", "final_val_loss", "wall_time_sec")
print({k: r.get(k) for k in keys if k in r})
PY
    grep -h "val loss\|step 150\|Error\|error" $d/train.log | tail -3 | cut -c1-150
  done
  rm -rf $C
done
tail -30 $R/regional_reduce-overhead_cold.log | cut -c1-200
cd $OUT && tar czf c1.tgz c1 && rm -rf c1
echo "total $(( $(date +%s) - T0 )) s"

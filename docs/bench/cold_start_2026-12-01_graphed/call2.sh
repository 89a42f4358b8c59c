#!/usr/bin/env bash
# session 2026-11-30i, call 2 on one H200 (issue 23): the head's loss compiled as a region; the CUDA test; the
# training-step benchmark full:reduce-overhead vs regional:reduce-overhead (GraphedRegional) in one invocation,
# profiled; then the cold and warm start of regional:reduce-overhead again (150 steps).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/c2; mkdir -p $R /tmp/dsm
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k "cuda" > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log)"
timeout 260 python scripts/bench/bench_train.py --variants ours,ours@reduce-overhead@regional --compile-mode reduce-overhead \
  --profile-steps 5 --timeout 200 --cache-dir /tmp/dsm/.cache/deepseek_mini --out $R/bench_train.json > $R/bench_train.txt 2>&1
echo "bench rc $? after $(( $(date +%s) - T0 )) s"; grep -v "^\s*$" $R/bench_train.txt | tail -25 | cut -c1-200
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
[ -d /tmp/dsm/.cache ] || timeout 100 python train.py $common trainer.max_steps=1 compile=false val_before_fit=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
setting=regional:reduce-overhead
C=$(mktemp -d)
for temp in cold warm; do
  d=$R/${setting//:/_}_$temp
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 python train.py $common compile=$setting hydra.run.dir=$d > $d.log 2>&1
  echo "$setting $temp rc $? after $(( $(date +%s) - T0 )) s"
  rm -rf $d/checkpoints
  python - $d <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
keys = ("time_to_first_step_sec", "fit_to_first_step_sec", "compile_time_sec", "tokens_per_sec", "peak_gpu_memory_gib", "val_loss", "wall_time_sec")
print({k: r.get(k) for k in keys if k in r})
PY
done
cd $OUT && tar czf c2.tgz c2 && rm -rf c2
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-12-01d, call 1 on one H200 (issue 23): region kinds compiled ahead in processes of their own
# (training/compile_ahead.py). The CUDA test, then on one machine cold starts with compile_ahead=auto and =false
# (same code), alternating, and a warm start; GPU memory per process sampled during the first cold start.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c1; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nproc > $R/env.txt; nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv >> $R/env.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_compile_ahead.py -k "gpu" > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log)"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.max_steps=30 trainer.val_check_interval=30 compile=regional:reduce-overhead"
timeout 100 python train.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then train.py arguments
  local name=$1; shift
  local C=${KEEP_CACHE:-$(mktemp -d)} d=/tmp/runs/$name
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 python train.py $common "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep -E "first step after|compile ahead" $R/$name.log
  python -c "import json,sys; r=json.load(open('$R/${name}_results.json')); print('  ', r['first_step_graphs'], r['compile_ahead'], r['tokens_per_sec'], r['peak_gpu_memory_gib'])" 2>/dev/null
  LAST_CACHE=$C
}
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader -lms 250 > $R/mem_new_cold.txt 2>&1 &
SMI=$!
one new_cold compile_ahead=auto
kill $SMI
KEEP_CACHE=$LAST_CACHE one new_warm compile_ahead=auto
one base_cold compile_ahead=false
one new_cold2 compile_ahead=auto
one base_cold2 compile_ahead=false
echo "total $(( $(date +%s) - T0 )) s"
sort -t, -k2 -n $R/mem_new_cold.txt | tail -8
tar -czf $OUT/c1.tgz -C $OUT c1 && rm -rf $R

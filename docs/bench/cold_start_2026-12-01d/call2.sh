#!/usr/bin/env bash
# session 2026-12-01d, call 2 on one H200 (issue 23): compile-ahead processes that start Inductor's workers at
# their own start, the training process's pool not started when they run; all five kinds vs the two block kinds
# only (DSMINI_COMPILE_AHEAD_KINDS, an experiment switch); base = compile_ahead=false, same code, same machine.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c2; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nproc > $R/env.txt; nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv >> $R/env.txt
echo "setup $(( $(date +%s) - T0 )) s"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.max_steps=30 trainer.val_check_interval=30 compile=regional:reduce-overhead"
timeout 100 python train.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then train.py arguments
  local name=$1; shift
  [ $(( $(date +%s) - T0 )) -gt 470 ] && { echo "$name skipped (time)"; return; }
  local C=$(mktemp -d) d=/tmp/runs/$name
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 120 python train.py $common "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d $C
  grep -E "first step after" $R/$name.log
  python -c "
import json; r = json.load(open('$R/${name}_results.json')); a = r['compile_ahead'] or {}
print('  ', r['first_step_graphs'], round(r['tokens_per_sec']))
for k, v in a.items(): print('    ', k, v['status'], v['seconds'], 'waited', v['waited'], v['phases'])" 2>/dev/null
}
one base_cold compile_ahead=false
one all_cold compile_ahead=auto
DSMINI_COMPILE_AHEAD_KINDS=dense_block,moe_block one blocks_cold compile_ahead=auto
one base_cold2 compile_ahead=false
DSMINI_COMPILE_AHEAD_KINDS=dense_block,moe_block one blocks_cold2 compile_ahead=auto
one all_cold2 compile_ahead=auto
echo "total $(( $(date +%s) - T0 )) s"
tar -czf $OUT/c2.tgz -C $OUT c2 && rm -rf $R

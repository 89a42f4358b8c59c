# 2026-12-01 session 6, call 7: time to first step at experiment=small_gpu as a user runs it (no overrides but the
# run's length): the default 50 validation batches before fit, the full corpus, wandb offline + csv, checkpoints on
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c7; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
echo "setup $(( $(date +%s) - T0 )) s"
timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then train.py arguments
  local name=$1; shift
  local C=$(mktemp -d) d=/tmp/runs/$name
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 200 python train.py experiment=small_gpu trainer.max_steps=30 trainer.val_check_interval=30 "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  python -c "import json; r=json.load(open('$R/${name}_results.json')); print('  ', r['time_to_first_step_sec'], r['startup_sec'], r['fit_to_first_step_sec'], r['compile_time_sec'], r['first_step_graphs'])" 2>/dev/null
}
one default_cold
one csv_cold logger=csv
one val5_cold logger=csv trainer.limit_val_batches=5
echo "total $(( $(date +%s) - T0 )) s"

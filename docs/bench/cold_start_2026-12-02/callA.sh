# 2026-12-02, call A: time to first step at experiment=small_gpu as a user runs it (the defaults: wandb
# Trees: .gpu/base = git archive b175b2e (whole blocks), .gpu/split = git archive 099f749 (halves), the working tree
# = 099f749 + an uncommitted trial that compiled whole blocks without CUDA graphs and halves under them (so the
# halves in call A and in call B's graphed variant, whole blocks in B's and C-D's 'whole' runs); the trial was not kept.
# offline + csv, checkpoints, all 23 validation batches before fit), empty Inductor/Triton caches per run, this
# tree (blocks split into halves only under CUDA graphs) alternating with b175b2e (whole blocks), then one warm run.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site
R=$OUT/cA; mkdir -p $R /tmp/dsm; ROOT=$PWD
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini $PWD/.gpu/base/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
PYTHONPATH=/tmp/site:$ROOT timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, tree, cache dir (empty = a new one), then train.py arguments
  local name=$1 tree=$2 C=${3:-$(mktemp -d)}; shift 3
  local d=/tmp/runs/$name
  (cd $tree && PYTHONPATH=/tmp/site:$tree TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 python train.py experiment=small_gpu trainer.max_steps=20 trainer.val_check_interval=20 "$@" hydra.run.dir=$d > $R/$name.log 2>&1)
  echo "$name rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  python -c "import json; r=json.load(open('$R/${name}_results.json')); print('  ', r['time_to_first_step_sec'], r['startup_sec'], r['fit_to_first_step_sec'], r['compile_time_sec'], r['first_step_graphs'], r.get('val_loss'))" 2>/dev/null
}
KEEP=$(mktemp -d)
one new_cold1 $ROOT $KEEP
one base_cold1 $ROOT/.gpu/base ""
one new_cold2 $ROOT ""
one base_cold2 $ROOT/.gpu/base ""
one new_cold3 $ROOT ""
one base_cold3 $ROOT/.gpu/base ""
one new_warm $ROOT $KEEP
echo "total $(( $(date +%s) - T0 )) s"

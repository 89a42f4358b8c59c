# 2026-12-02, call E: time to first step of small_gpu (this code: the halves), cold then warm (the same caches), as a user runs it but without checkpoints and 10 steps
# Trees: the working tree is 2326e9f (the halves).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site
R=/tmp/cE; mkdir -p $R /tmp/dsm; ROOT=$PWD
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
PYTHONPATH=/tmp/site:$ROOT timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, cache dir, then train.py arguments
  local name=$1 C=$2; shift 2
  local d=/tmp/runs/$name
  PYTHONPATH=/tmp/site:$ROOT TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 120 python train.py experiment=small_gpu trainer.max_steps=10 trainer.val_check_interval=10 callbacks.model_checkpoint=null "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep "first step after" $R/$name.log
  tar -czf $OUT/cE.tgz -C /tmp cE
}
KEEP=$(mktemp -d)
one halves_cold $KEEP
one halves_warm $KEEP
echo "total $(( $(date +%s) - T0 )) s"

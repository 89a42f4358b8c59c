# 2026-12-02 session 2, call 1: where a cold small_gpu start goes (py-spy of the main thread, torch's per-phase
# compile times), and the embedding + final norm left eager (EXP_REGIONS=blocks_loss) alternating with this code.
# Tree: 8a9e6b2. In this call wrap.py (the version here has EXP_HIDE instead) also held the region switch, before
# running train.py:
#   import deepseek_mini.training.compile as c; orig = c.compile_regions_of
#   c.compile_regions_of = lambda model: [(m, n) for m, n in orig(model)
#                                         if n != "forward" or type(m).__name__ == "LinearCrossEntropy"]
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .gpu/py_spy-*.whl || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=/tmp/c1; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; python -c "import torch; print(torch.__version__)" >> $R/gpu.txt; nproc >> $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, prefix command ('' or py-spy), then env assignments via env
  local name=$1 pre=$2; shift 2
  local C=$(mktemp -d) d=/tmp/runs/$name
  env "$@" DIAG_OUT=$R/$name.json TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 $pre python .gpu/wrap.py experiment=small_gpu trainer.max_steps=3 callbacks.model_checkpoint=null hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s: $(grep DIAG $R/$name.log)"
  pkill -f compile_worker; pkill -f wandb; sleep 1; rm -rf $d $C
  tar -czf $OUT/c1.tgz -C /tmp c1
}
one base_spy "/tmp/site/bin/py-spy record --idle -r 200 -f speedscope -o $R/base_spy.speedscope --" X=1
one base1 "" X=1
one fewer1 "" EXP_REGIONS=blocks_loss
one base2 "" X=1
one fewer2 "" EXP_REGIONS=blocks_loss
one base3 "" X=1
one fewer3 "" EXP_REGIONS=blocks_loss
echo "total $(( $(date +%s) - T0 )) s"

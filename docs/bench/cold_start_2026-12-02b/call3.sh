# 2026-12-02 session 2, call 3: torchmetrics' optional imports (transformers, scipy, scikit-learn, torchvision where
# installed) at launch: the imports before train() timed alone, then cold small_gpu starts alternating as the image
# is / with those packages hidden from torchmetrics' availability checks (EXP_HIDE), one machine.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=/tmp/c3; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
HIDE=transformers,scipy,sklearn,torchvision
for i in 1 2 3; do echo "as is: $(python .gpu/imp.py)"; echo "hidden: $(EXP_HIDE=$HIDE python .gpu/imp.py)"; done | tee $R/imports.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then env assignments
  local name=$1; shift
  local C=$(mktemp -d) d=/tmp/runs/$name
  env "$@" DIAG_OUT=$R/$name.json TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 100 python .gpu/wrap.py experiment=small_gpu trainer.max_steps=3 callbacks.model_checkpoint=null hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s: $(grep DIAG $R/$name.log)"
  pkill -f compile_worker; pkill -f wandb; sleep 1; rm -rf $d $C
  tar -czf $OUT/c3.tgz -C /tmp c3
}
one asis1 X=1
one hide1 EXP_HIDE=$HIDE
one asis2 X=1
one hide2 EXP_HIDE=$HIDE
one asis3 X=1
one hide3 EXP_HIDE=$HIDE
echo "total $(( $(date +%s) - T0 )) s"

# 2026-12-02 session 2, call 2: cold starts alternating this code / embedding eager (EXP_REGIONS=no_embed) /
# embedding + final norm eager (blocks_loss), one with torchmetrics' optional packages hidden (EXP_HIDE), then the
# steady step of each region setting (bench_train, 30 steps + 3 profiled), one machine.
# Tree: 8a9e6b2 + a temporary switch at the end of training/compile.compile_regions_of (not kept), so that
# bench_train's subprocesses saw it too:
#   exp = os.environ.get("EXP_REGIONS", "")
#   if exp == "no_embed": extra = [m for m in extra if not isinstance(m, nn.Embedding)]
#   elif exp == "blocks_loss": extra = [m for m in extra if isinstance(m, LinearCrossEntropy)]
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=/tmp/c2; mkdir -p $R /tmp/dsm; ROOT=$PWD
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini $PWD/scripts > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; python -c "import torch; print(torch.__version__)" >> $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null trainer.limit_val_batches=2 hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then env assignments
  local name=$1; shift
  local C=$(mktemp -d) d=/tmp/runs/$name
  env "$@" DIAG_OUT=$R/$name.json TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 100 python .gpu/wrap.py experiment=small_gpu trainer.max_steps=3 callbacks.model_checkpoint=null hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s: $(grep DIAG $R/$name.log)"
  pkill -f compile_worker; pkill -f wandb; sleep 1; rm -rf $d $C
  tar -czf $OUT/c2.tgz -C /tmp c2
}
one base1 X=1
one noemb1 EXP_REGIONS=no_embed
one bl1 EXP_REGIONS=blocks_loss
one base2 X=1
one noemb2 EXP_REGIONS=no_embed
one hide1 EXP_HIDE=transformers,scipy,sklearn,torchvision
bench() {  # name, env assignment
  env $2 timeout 130 python scripts/bench/bench_train.py --variants ours@reduce-overhead@regional --steps 30 --profile-steps 3 \
     --data $ROOT/.data/gutenberg_classics_train.txt.gz --val-data $ROOT/.data/gutenberg_classics_valid.txt \
     --cache-dir /tmp/dsm/.cache/deepseek_mini --timeout 110 --out $R/bench_$1.json > $R/bench_$1.txt 2>&1
  echo "bench $1 rc $? after $(( $(date +%s) - T0 )) s: $(grep -E 'tok/s|tokens/s' $R/bench_$1.txt | tail -2)"
  tar -czf $OUT/c2.tgz -C /tmp c2
}
bench base X=1
bench blocks_loss EXP_REGIONS=blocks_loss
bench no_embed EXP_REGIONS=no_embed
echo "total $(( $(date +%s) - T0 )) s"

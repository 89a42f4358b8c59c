#!/usr/bin/env bash
# session 2026-12-01c, call 1 on one H200 (issue 23): where the cold start's seconds go outside the compiler.
# HEAD (f51c880) under a 5 ms wall-clock sampler of the main thread (.gpu/with_times.py SAMPLE_OUT): the
# cold_start.sh command cold and warm, then the plain `experiment=small_gpu` command (full corpus, 50 validation
# batches) cold after its own prep. Bytecode compiled once (compileall). Small files only, in one archive.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c1; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; f = plt.figure(); f.text(0, 0, 'x'); f.savefig('/tmp/x.png')"
(nproc; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python -c "import torch, triton; print(torch.__version__, triton.__version__)") > $R/env.txt 2>&1
echo "setup $(( $(date +%s) - T0 )) s"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
timeout 100 python train.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, then train.py arguments
  local name=$1; shift
  local C=${KEEP_CACHE:-$(mktemp -d)} d=/tmp/runs/$name
  SAMPLE_OUT=$R/${name}_samples.json.gz TIMES_OUT=$R/${name}_compile_times.txt TORCHINDUCTOR_CACHE_DIR=$C/inductor \
    TRITON_CACHE_DIR=$C/triton timeout 150 python .gpu/with_times.py "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s; $(find $C/triton -name '*.cubin' | wc -l) cubins"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep -E "first step after|tokens/s$|^val loss" $R/$name.log
  LAST_CACHE=$C
}
one cold $common compile=regional:reduce-overhead
KEEP_CACHE=$LAST_CACHE one warm $common compile=regional:reduce-overhead
timeout 150 python train.py experiment=small_gpu trainer.max_steps=1 compile=false logger=none callbacks.model_checkpoint=null hydra.run.dir=/tmp/prep > $R/prep_full.log 2>&1
echo "prep_full rc $? after $(( $(date +%s) - T0 )) s"; grep "first step after" $R/prep_full.log; rm -rf /tmp/prep
one plain_cold experiment=small_gpu trainer.max_steps=10 logger=csv callbacks.model_checkpoint=null
echo "total $(( $(date +%s) - T0 )) s"
tar -czf $OUT/c1.tgz -C $OUT c1 && rm -rf $R

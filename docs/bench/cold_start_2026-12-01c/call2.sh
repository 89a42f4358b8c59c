#!/usr/bin/env bash
# session 2026-12-01c, call 2 on one H200 (issue 23): our Triton kernels compiled ahead (background threads at
# train() start and at configure_optimizers) and the pre-fit heatmap drawn after the first step. CUDA tests first;
# then on one machine, 150-step cold starts of this code and of f51c880 (.gpu/base, session start), this code
# warm, and a second cold start of this code (30 steps). Main thread sampled; every Triton compile logged.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c2; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini $PWD/.gpu/base/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; f = plt.figure(); f.text(0, 0, 'x'); f.savefig('/tmp/x.png')"
echo "setup $(( $(date +%s) - T0 )) s"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_compile_startup.py tests/test_compile.py tests/test_adamw.py -k "gpu or graphed or cuda or released or compiled_ahead or compile_ahead" -W always > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log); $(grep -c AccumulateGrad $R/tests.log) stream warnings"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
timeout 100 python train.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, code dir, then train.py arguments
  local name=$1 code=$2; shift 2
  local C=${KEEP_CACHE:-$(mktemp -d)} d=/tmp/runs/$name
  PYTHONPATH=/tmp/site:$code TRAIN_PY=$code/train.py SAMPLE_OUT=$R/${name}_samples.json.gz COMPILE_LOG=$R/${name}_triton.txt \
    TIMES_OUT=$R/${name}_compile_times.txt TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton \
    timeout 150 python .gpu/with_times.py $common "$@" hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s; $(find $C/triton -name '*.cubin' | wc -l) cubins; $(grep -c AccumulateGrad $R/$name.log) stream warnings"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; ls $d > $R/${name}_files.txt; rm -rf $d
  grep -E "first step after|tokens/s$|^val loss" $R/$name.log
  grep -vE "triton-compile-ahead" $R/${name}_triton.txt | grep -E "_top_k_rows|_swiglu_backward|_adamw_kernel|_sum_squares" | sed 's/^/  main-thread compile: /'
  LAST_CACHE=$C
}
one new_cold $PWD compile=regional:reduce-overhead
KEEP_CACHE=$LAST_CACHE one new_warm $PWD compile=regional:reduce-overhead
one base_cold $PWD/.gpu/base compile=regional:reduce-overhead
one new_cold2 $PWD compile=regional:reduce-overhead trainer.max_steps=30 trainer.val_check_interval=30
echo "total $(( $(date +%s) - T0 )) s"
tar -czf $OUT/c2.tgz -C $OUT c2 && rm -rf $R

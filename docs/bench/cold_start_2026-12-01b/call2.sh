#!/usr/bin/env bash
# session 2026-12-01b, call 2 on one H200 (issue 23): the CUDA graphed-regional test (no AccumulateGrad stream
# warning: own warm-up + released recording graph); the validation before fit profiled (prep run); cold starts
# (150 steps, bytecode compiled once with compileall) of this code, as it is and with one Triton config per
# pointwise kernel; the kept setting warm. Small files only, packed into one archive at the end.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c2; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
t=$(date +%s); PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > $R/compileall.log 2>&1
echo "compileall rc $? in $(( $(date +%s) - t )) s"
export PYTHONPYCACHEPREFIX=/tmp/pyc
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k "graphed" -W always > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log); $(grep -c AccumulateGrad $R/tests.log) stream warnings"
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
PROF_VAL=$R/prep_val_profile.txt timeout 100 python .gpu/with_times.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; grep "first step after" $R/prep.log; rm -rf /tmp/prep
one() {  # name [env...]: a run of this code with compile=regional:reduce-overhead
  local name=$1; shift
  local C=${KEEP_CACHE:-$(mktemp -d)} d=/tmp/runs/$name
  env "$@" TIMES_OUT=$R/${name}_compile_times.txt TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton \
    timeout 140 python .gpu/with_times.py $common compile=regional:reduce-overhead hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s; $(grep -c AccumulateGrad $R/$name.log) stream warnings; $(find $C/triton -name '*.cubin' | wc -l) cubins"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep -E "first step after|tokens/s$" $R/$name.log
  grep -E "async_compile.wait|^_compile.compile_inner|benchmark_all_configs|bw_compiler|fw_compiler_base" $R/${name}_compile_times.txt | tr -s ' ' | tr '\n' ';'; echo
  LAST_CACHE=$C
}
one cold X=1
KEEP_CACHE=$LAST_CACHE one warm X=1
one cold_nopw NO_PW_AUTOTUNE=1
echo "total $(( $(date +%s) - T0 )) s"
tar -czf $OUT/c2.tgz -C $OUT c2 && rm -rf $R

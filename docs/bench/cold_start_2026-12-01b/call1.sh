#!/usr/bin/env bash
# session 2026-12-01b, call 1 on one H200 (issue 23): the CUDA graphed-regional test (AccumulateGrad stream
# warning gone?); the image's bytecode state; the validation before fit profiled (prep run); cold starts of
# regional:reduce-overhead: this code vs 85f2ada (.gpu/base) as the image is, then this code with the
# installed packages' bytecode compiled (compileall), cold and warm. Only small files under $OUT.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/c1; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
{ env | grep -E "^PYTHON|^UV" ; echo "site-packages $SP"; ls -d $SP/torch/__pycache__ 2>&1 | head -1;
  echo "torch pyc files: $(find $SP/torch -name '*.pyc' 2>/dev/null | wc -l), py files: $(find $SP/torch -name '*.py' | wc -l)";
  test -w $SP && echo writable || echo "not writable"; nproc; } > $R/env.txt 2>&1
cat $R/env.txt
PYTHONPATH=/tmp/site:$PWD timeout 120 python -m pytest -q -p no:cacheprovider tests/test_compile.py -k "graphed" -W always > $R/tests.log 2>&1
echo "tests rc $? after $(( $(date +%s) - T0 )) s: $(tail -1 $R/tests.log)"; grep -c "AccumulateGrad" $R/tests.log
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=2"
PYTHONPATH=/tmp/site:$PWD PROF_VAL=$R/prep_val_profile.txt timeout 100 python .gpu/with_times.py $common compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, code dir, extra args
  local name=$1 code=$2; shift 2
  local C=$(mktemp -d) d=/tmp/runs/$name
  [ -n "$KEEP_CACHE" ] && C=$KEEP_CACHE
  PYTHONPATH=/tmp/site:$code TIMES_OUT=$R/${name}_compile_times.txt TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton \
    TRAIN_PY=$code/train.py timeout 130 python .gpu/with_times.py $common compile=regional:reduce-overhead hydra.run.dir=$d "$@" > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s; $(grep -c AccumulateGrad $R/$name.log) stream warnings"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep "first step after" $R/$name.log
  LAST_CACHE=$C
}
one base_asis .gpu/base
one new_asis $PWD
t=$(date +%s); PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > $R/compileall.log 2>&1
echo "compileall rc $? in $(( $(date +%s) - t )) s"
export PYTHONPYCACHEPREFIX=/tmp/pyc
one new_pyc $PWD
KEEP_CACHE=$LAST_CACHE one new_pyc_warm $PWD
echo "total $(( $(date +%s) - T0 )) s"

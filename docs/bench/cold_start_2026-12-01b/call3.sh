#!/usr/bin/env bash
# session 2026-12-01b, call 3 on one H200 (issue 23), diagnostic: where the cold compile waits. One cold run of
# regional:reduce-overhead (2 steps) with Inductor's INFO log (per-graph start/end) and the completion time and
# name of every Triton kernel compiled (the Triton cache's cubin files).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm PYTHONPATH=/tmp/site:$PWD
R=$OUT/c3; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.max_steps=2"
C=$(mktemp -d)
date +%s.%N > $R/launch.txt
TORCH_LOGS="inductor,aot" TIMES_OUT=$R/compile_times.txt TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton \
  timeout 150 python .gpu/with_times.py $common compile=regional:reduce-overhead hydra.run.dir=/tmp/runs/d > $R/cold.log 2>&1
echo "cold rc $? after $(( $(date +%s) - T0 )) s"; grep "first step after" $R/cold.log
find $C/triton -name '*.cubin' -printf '%T@ %s %f\n' | sort -n > $R/cubins.txt
find $C/triton -name '*.json' -printf '%T@ %f\n' | sort -n > $R/triton_json.txt
find $C/inductor -name '*.py' -printf '%T@ %s %p\n' | sort -n > $R/inductor_py.txt
wc -l $R/cubins.txt $R/inductor_py.txt
tar -czf $OUT/c3.tgz -C $OUT c3 && rm -rf $R /tmp/runs/d
echo "total $(( $(date +%s) - T0 )) s"

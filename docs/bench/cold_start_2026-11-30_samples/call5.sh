#!/usr/bin/env bash
# session 2026-11-30h, call 5 on one H200 (issue 23): where a cold start's time goes before the first step.
# experiment=small_gpu on 5M characters of the Gutenberg train file (prepared first, untimed), empty Inductor and
# Triton caches, the run under cProfile; then the same run warm (same caches) without the profiler.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/cold; mkdir -p $R /tmp/dsm
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5"
timeout 150 python train.py $common trainer.max_steps=1 compile=false val_before_fit=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; tail -2 $R/prep.log
C=$(mktemp -d)
T1=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 300 python -m cProfile -o $R/cold.prof train.py $common \
  trainer.max_steps=3 hydra.run.dir=$R/cold_run > $R/cold.log 2>&1
echo "cold rc $? after $(( $(date +%s) - T0 )) s (wall $(( $(date +%s) - T1 )) s)"
grep -h "first_step\|compile_time\|fit_to" $R/cold_run/results.json | head
T1=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 python train.py $common trainer.max_steps=3 \
  hydra.run.dir=$R/warm_run > $R/warm.log 2>&1
echo "warm rc $? after $(( $(date +%s) - T0 )) s (wall $(( $(date +%s) - T1 )) s)"
grep -h "first_step\|compile_time\|fit_to" $R/warm_run/results.json | head
python - $R/cold.prof <<'PY' > $R/cold_top.txt 2>&1
import pstats, sys
s = pstats.Stats(sys.argv[1]); s.sort_stats("cumulative").print_stats(70)
PY
head -100 $R/cold_top.txt | tail -75
rm -rf $R/cold_run/checkpoints $R/warm_run/checkpoints
cd $OUT && tar czf cold.tgz cold && rm -rf cold
echo "total $(( $(date +%s) - T0 )) s"

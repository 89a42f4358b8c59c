#!/usr/bin/env bash
# session 2026-11-30c, call B on 2 H200s: EP=2 with compile=regional vs DDP with compile=regional (22), then a
# short profiled EP run (the all-to-all's share of GPU time)
T0=$(date +%s); export DEADLINE=$(( T0 + ${CALL_BUDGET:-560} ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline DATA_ROOT=$PWD/.data
mkdir -p /tmp/dsm_cache && cp -r .tokcache/* /tmp/dsm_cache/
M=$OUT/mg; mkdir -p $M
echo "setup $(( $(date +%s) - T0 )) s"
run() {  # run NAME STAGES [ENV=..]
  local name=$1 st=$2; shift 2
  env "$@" OUT=$M/$name RUNS=/tmp/runs_$name CACHE=/tmp/dsm_cache MG_STAGES=$st \
    bash scripts/bench/multi_gpu.sh > $M/$name.stdout 2>&1
  grep -v "python train.py" $M/$name/plan.log | cut -c1-300
  for f in $M/$name/results_*.json; do python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); k = ("status", "tokens_per_sec", "time_to_first_step_sec", "fit_to_first_step_sec",
  "compile_time_sec", "peak_gpu_memory_gib", "val_loss", "wall_time_sec")
print(sys.argv[1].split("/")[-1], {x: r.get(x) for x in k})
PY
  done
  grep -h -i "error\|Traceback" $M/$name/logs/*.log | sort | uniq -c | sort -rn | head -8
}
run ep_regional ep RUN_TIMEOUT=240 EP_COMPILE=regional
run ddp_regional ddp RUN_TIMEOUT=220 DDP_COMPILE=regional DDP_FALLBACK=0
left=$(( DEADLINE - $(date +%s) - 10 ))
echo "profile with $left s left"
P=$M/ep_profile; mkdir -p $P
timeout --signal=TERM --kill-after=20 $left python train.py experiment=ep_small_gpu trainer.max_steps=12 \
  trainer.val_check_interval=12 trainer.limit_val_batches=8 val_before_fit=false logger=csv callbacks.samples=null \
  callbacks.progress_bar=null callbacks.model_checkpoint=null paths.cache_dir=/tmp/dsm_cache data.batch_size=16 \
  +trainer.profiler._target_=lightning.pytorch.profilers.PyTorchProfiler +trainer.profiler.dirpath=$P \
  +trainer.profiler.filename=ep +trainer.profiler.export_to_chrome=false +trainer.profiler.sort_by_key=cuda_time_total \
  +trainer.profiler.row_limit=60 +trainer.profiler.record_module_names=false \
  hydra.run.dir=/tmp/runs/ep_profile > $P/ep_profile.log 2>&1
echo "profile rc $?"; ls $P
grep -h -i "nccl\|ProfilerStep\|Self CUDA time total" $P/fit-*.txt 2>/dev/null | cut -c1-220 | head -20
cd $OUT && tar czf mg.tgz mg && rm -rf mg
echo "total $(( $(date +%s) - T0 )) s"

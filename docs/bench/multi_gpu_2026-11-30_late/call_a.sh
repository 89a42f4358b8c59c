#!/usr/bin/env bash
# session 2026-11-30c, call A on 2 H200s: FSDP x2 with compile=regional (21), EP=2 beyond one GPU's memory (22)
T0=$(date +%s); export DEADLINE=$(( T0 + ${CALL_BUDGET:-560} ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline DATA_ROOT=$PWD/.data
mkdir -p /tmp/dsm_cache && cp -r .tokcache/* /tmp/dsm_cache/
M=$OUT/mg; mkdir -p $M
nvidia-smi --query-gpu=name,memory.total --format=csv > $M/gpus.txt
echo "setup $(( $(date +%s) - T0 )) s"
run() {  # run NAME STAGES [ENV=..]
  local name=$1 st=$2; shift 2
  env "$@" OUT=$M/$name RUNS=/tmp/runs_$name CACHE=/tmp/dsm_cache MG_STAGES=$st \
    bash scripts/bench/multi_gpu.sh > $M/$name.stdout 2>&1
  grep -v "python train.py" $M/$name/plan.log | cut -c1-300
  for f in $M/$name/results_*.json; do python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); k = ("status", "tokens_per_sec", "time_to_first_step_sec", "fit_to_first_step_sec",
  "compile_time_sec", "peak_gpu_memory_gib", "val_loss", "final_val_loss", "wall_time_sec", "parameters")
print(sys.argv[1].split("/")[-1], {x: r.get(x) for x in k})
PY
  done
  grep -h -i "error\|warn.*stream\|Traceback" $M/$name/logs/*.log | sort | uniq -c | sort -rn | head -8
}
run fsdp_regional fsdp RUN_TIMEOUT=260 FSDP_COMPILE=regional
grep -h "val/loss\|train/loss" $M/fsdp_regional/metrics_fsdp.csv 2>/dev/null | head -0
run ep_big ep_big RUN_TIMEOUT=330 BIG_STEPS=40
df -h /tmp | tail -1
cd $OUT && tar czf mg.tgz mg && rm -rf mg
echo "total $(( $(date +%s) - T0 )) s"

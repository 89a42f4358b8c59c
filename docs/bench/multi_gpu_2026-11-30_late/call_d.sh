#!/usr/bin/env bash
# session 2026-11-30c, call D on 2 H200s: EP=2 padded dispatch + compile=regional, then DDP regional (22)

T0=$(date +%s); export DEADLINE=$(( T0 + ${CALL_BUDGET:-470} ))
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
run ep_padded ep RUN_TIMEOUT=240 EP_COMPILE=regional EP_DISPATCH=padded
run ddp_regional ddp RUN_TIMEOUT=220 DDP_COMPILE=regional DDP_FALLBACK=0
cd $OUT && tar czf mg.tgz mg && rm -rf mg
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30d, call A on 2 H200s: EP=2 padded + whole-model CUDA graphs (new), EP padded regional (the
# `waited` fix, to 150 steps), then DDP full:reduce-overhead (the same compile, same call)
T0=$(date +%s); export DEADLINE=$(( T0 + ${CALL_BUDGET:-560} ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline DATA_ROOT=$PWD/.data
mkdir -p /tmp/dsm_cache && cp -r .tokcache/* /tmp/dsm_cache/
M=$OUT/mg; mkdir -p $M
nvidia-smi --query-gpu=name,driver_version --format=csv > $M/gpus.txt; python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())" >> $M/gpus.txt
echo "setup $(( $(date +%s) - T0 )) s"
run() {  # run NAME STAGES [ENV=..]
  local name=$1 st=$2; shift 2
  env "$@" OUT=$M/$name RUNS=/tmp/runs_$name CACHE=/tmp/dsm_cache MG_STAGES=$st \
    bash scripts/bench/multi_gpu.sh > $M/$name.stdout 2>&1
  grep -v "python train.py" $M/$name/plan.log | cut -c1-300
  for f in $M/$name/results_*.json; do python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); k = ("status", "compile", "tokens_per_sec", "time_to_first_step_sec",
  "compile_time_sec", "peak_gpu_memory_gib", "val_loss", "val_history", "wall_time_sec")
print(sys.argv[1].split("/")[-1], {x: r.get(x) for x in k})
PY
  done
  python3 - $M/$name/metrics_*.csv <<'PY'
import csv, sys
for f in sys.argv[1:]:
    rows = list(csv.DictReader(open(f)))
    print(f.split("/")[-1], [(r["step"], r["train/loss"][:6]) for r in rows if r.get("train/loss")][:16])
PY
  grep -h -i "error\|Traceback\|skipping cudagraphs\|warn" $M/$name/logs/*.log | cut -c1-240 | sort | uniq -c | sort -rn | head -8
}
run ep_padded_cg ep RUN_TIMEOUT=230 EP_COMPILE=full:reduce-overhead EP_DISPATCH=padded
run ep_padded ep RUN_TIMEOUT=170 EP_COMPILE=regional EP_DISPATCH=padded
run ddp_cg ddp RUN_TIMEOUT=170 DDP_COMPILE=full:reduce-overhead DDP_FALLBACK=0
cd $OUT && tar czf mg.tgz mg && rm -rf mg
echo "total $(( $(date +%s) - T0 )) s"

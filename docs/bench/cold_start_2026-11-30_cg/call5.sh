#!/usr/bin/env bash
# session 2026-11-30f, call 5 on one H200 (issue 23, exploratory): cold start (empty Inductor/Triton caches) of
# experiment=small_gpu with per-block CUDA graphs (compile=regional:reduce-overhead, refused by the run config, allowed
# here by .gpu/cg_block.py) against the default whole-model CUDA graphs, 150 steps each: time to first step, steady
# tokens/s, and whether the per-block run trains (val loss at step 150 against the whole-model run's)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline DATA_ROOT=$PWD/.data
mkdir -p /tmp/dsm_cache && cp -r .tokcache/* /tmp/dsm_cache/
R=$OUT/cold; mkdir -p $R
common="experiment=small_gpu trainer.max_steps=150 trainer.val_check_interval=150 trainer.limit_val_batches=10 scheduler.warmup_steps=20 paths.cache_dir=/tmp/dsm_cache paths.log_dir=/tmp/logs logger=csv callbacks.model_checkpoint=null"
run() { name=$1; lim=$2; shift 2; caches=$(mktemp -d); t0=$(date +%s)
  TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton timeout $lim \
    python .gpu/cg_block.py $common hydra.run.dir=/tmp/logs/$name "$@" > $R/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s)-t0 )) s (call at $(( $(date +%s)-T0 )) s)"
  cp /tmp/logs/$name/results.json $R/results_$name.json 2>/dev/null
  python3 -c "import json;r=json.load(open('/tmp/logs/$name/results.json'));print({k:r.get(k) for k in ['status','val_loss','val_loss_start','train_loss','tokens_per_sec','peak_gpu_memory_gib','time_to_first_step_sec','fit_to_first_step_sec','compile_time_sec','wall_time_sec']})" 2>&1 | tail -1
  grep -i "inf\b\|nan\|AccumulateGrad\|warn" $R/$name.log | grep -v "^\s*$" | cut -c1-200 | sort | uniq -c | head -8; }
run regional_cg 230 compile=regional:reduce-overhead
run full_cg 260 compile=full:reduce-overhead
cd $OUT && tar czf cold.tgz cold && rm -rf cold
echo "total $(( $(date +%s) - T0 )) s"

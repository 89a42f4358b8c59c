#!/usr/bin/env bash
# session 2026-11-30f, call 6 on one H200: the masters released onto the CPU after Lightning's teardown (the end-of-run
# save that failed in call 5), its CUDA test; and the per-block CUDA-graph cold start again, now to results.json
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline DATA_ROOT=$PWD/.data
mkdir -p /tmp/dsm_cache && cp -r .tokcache/* /tmp/dsm_cache/
R=$OUT/cold; mkdir -p $R
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_adamw.py -k released > $R/pytest.txt 2>&1; echo "pytest rc $?"; tail -1 $R/pytest.txt
common="experiment=small_gpu trainer.max_steps=150 trainer.val_check_interval=150 trainer.limit_val_batches=10 scheduler.warmup_steps=20 paths.cache_dir=/tmp/dsm_cache paths.log_dir=/tmp/logs logger=csv callbacks.model_checkpoint=null"
name=regional_cg; caches=$(mktemp -d); t0=$(date +%s)
TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton timeout 200 \
  python .gpu/cg_block.py $common hydra.run.dir=/tmp/logs/$name compile=regional:reduce-overhead > $R/$name.log 2>&1
echo "== $name rc=$? $(( $(date +%s)-t0 )) s"
cp /tmp/logs/$name/results.json $R/results_$name.json 2>/dev/null; ls /tmp/logs/$name/checkpoints 2>&1 | head -3
python3 -c "import json;r=json.load(open('/tmp/logs/$name/results.json'));print({k:r.get(k) for k in ['status','val_loss','val_loss_start','train_loss','tokens_per_sec','peak_gpu_memory_gib','time_to_first_step_sec','fit_to_first_step_sec','compile_time_sec','wall_time_sec']})" 2>&1 | tail -1
cd $OUT && tar czf cold.tgz cold && rm -rf cold
echo "total $(( $(date +%s) - T0 )) s"

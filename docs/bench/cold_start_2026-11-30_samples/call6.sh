#!/usr/bin/env bash
# session 2026-11-30h, call 6 on one H200 (issue 23): time to the first step, cold then warm, with samples no longer
# taken at the validation before training (callbacks.samples.at_start=false, the new default); same data as call 5.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/cold6; mkdir -p $R /tmp/dsm
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.max_steps=3"
timeout 100 python train.py $common trainer.max_steps=1 compile=false val_before_fit=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"
C=$(mktemp -d)
for temp in cold warm; do
  TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton timeout 150 python train.py $common hydra.run.dir=$R/$temp > $R/$temp.log 2>&1
  echo "$temp rc $? after $(( $(date +%s) - T0 )) s"
  grep -h "first_step\|compile_time\|fit_to" $R/$temp/results.json
  grep -h "global batch\|val loss before\|sample @ step 0" $R/$temp/train.log | cut -c1-90
done
cd $OUT && tar czf cold6.tgz cold6 && rm -rf cold6
echo "total $(( $(date +%s) - T0 )) s"

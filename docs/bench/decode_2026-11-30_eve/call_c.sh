#!/usr/bin/env bash
# session 2026-11-30d, call C on one H200 (24): the decode step re-measured with the refit MoE launch rule, then the
# same step compiled with Inductor's max_autotune (GEMM templates) + coordinate-descent tuning of its kernels
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 210 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 --no-capacity --bandwidth 4.3 --profile 3 --out $R/decode.json > $R/decode.txt 2>&1
echo "decode rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | tail -14
left=$(( ${CALL_BUDGET:-500} - ($(date +%s) - T0) ))
echo "tuned with $left s"
timeout $left python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled --batches 32 \
  --contexts 32768 8192 --no-capacity --bandwidth 4.3 --profile 3 --inductor max_autotune=True \
  coordinate_descent_tuning=True --out $R/decode_tuned.json > $R/decode_tuned.txt 2>&1
echo "tuned rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_tuned.txt | tail -12
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30c, call C on one H200: the decode step with the Triton MoE decode kernels (24)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 260 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 --no-capacity --bandwidth 4.3 --profile 3 --out $R/decode.json > $R/decode.txt 2>&1
echo "decode rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^    " $R/decode.txt | tail -30
left=$(( ${CALL_BUDGET:-555} - ($(date +%s) - T0) ))
echo "moe tune with $left s"
timeout $left python scripts/bench/moe_decode_tune.py --batches 32 1 --context 32768 --block-n 32 64 128 \
  --block-k 64 128 --warps 4 8 --stages 3 4 --crossover 1 32 64 128 170 --out $R/moe_decode.json > $R/moe_decode.txt 2>&1
echo "moe rc $? after $(( $(date +%s) - T0 )) s"
tail -40 $R/moe_decode.txt | cut -c1-200
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30e, call 1 on one H200 (24): the decode step compiled with Inductor's freezing (weights folded)
# and the router's fp32 logits from a bf16 GEMM; then the same without freezing, for attribution
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe.py -k "router" > $R/pytest_router.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -3 $R/pytest_router.txt
timeout 230 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 --no-capacity --bandwidth 4.3 --profile 3 --check --out $R/decode.json > $R/decode.txt 2>&1
echo "decode rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | grep -v Warn | tail -16
left=$(( ${CALL_BUDGET:-540} - ($(date +%s) - T0) ))
echo "no-freeze with $left s"
timeout $left python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 32768 --no-capacity --bandwidth 4.3 --profile 3 --no-freeze --out $R/decode_nofreeze.json \
  > $R/decode_nofreeze.txt 2>&1
echo "no-freeze rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_nofreeze.txt | grep -v Warn | tail -10
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

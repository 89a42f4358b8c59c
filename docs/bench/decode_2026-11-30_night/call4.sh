#!/usr/bin/env bash
# session 2026-11-30e, call 4 on one H200 (24): the decode step as committed (c6eb077: the router's bf16 GEMM with
# fp32 output; concatenated projections; no freezing), MLA and MHA in one invocation
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe.py -k "router" > $R/pytest_router.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -1 $R/pytest_router.txt
timeout 300 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 --no-capacity --bandwidth 4.3 --profile 3 --check --out $R/decode.json > $R/decode.txt 2>&1
echo "decode rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | grep -v Warn | tail -16
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

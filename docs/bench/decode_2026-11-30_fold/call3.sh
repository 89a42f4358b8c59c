#!/usr/bin/env bash
# session 2026-11-30f, call 3 on one H200 (issue 24): folded weights (W_UK folded into the query projection, the
# concatenations once, router + shared gate/up in one GEMM; W_UV in the merge kernel, q rope in the split kernel for both) vs unfolded
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe.py -k "router or folded" > $R/pytest_router.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -1 $R/pytest_router.txt
C="--no-capacity --bandwidth 4.3"
timeout 400 python scripts/bench/bench_decode.py --variants mla_absorb mha mla_absorb_unfolded mha_unfolded \
  --modes compiled --batches 32 --contexts 8192 32768 $C --profile 3 --check --out $R/decode.json > $R/decode.txt 2>&1
echo "compiled rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
timeout 100 python scripts/bench/bench_decode.py --variants mla_absorb mla_absorb_unfolded --modes eager \
  --batches 1 32 --contexts 8192 $C --out $R/eager.json > $R/eager.txt 2>&1
echo "eager rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager.txt
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

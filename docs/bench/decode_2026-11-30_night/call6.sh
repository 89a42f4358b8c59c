#!/usr/bin/env bash
# session 2026-11-30e, call 6 on one H200 (24): MoE decode routing in one kernel (moe_decode.route, one program per 32 assignments) with the expert
# kernels reading the tokens' rows in place, against the same code with that path off (.gpu/old_route.py)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe.py -k "router" > $R/pytest_router.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -1 $R/pytest_router.txt
C="--no-capacity --bandwidth 4.3"
timeout 240 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 $C --profile 3 --check --out $R/decode.json > $R/decode.txt 2>&1
echo "new rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
timeout 150 python .gpu/old_route.py --variants mla_absorb mha --modes compiled --batches 32 --contexts 32768 $C \
  --profile 3 --out $R/decode_old_route.json > $R/decode_old_route.txt 2>&1
echo "old rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_old_route.txt | grep -v Warn | grep "compiled batch\|GPU kernels"
for v in new old; do
  cmd="python scripts/bench/bench_decode.py"; [ $v = old ] && cmd="python .gpu/old_route.py"
  timeout 60 $cmd --variants mla_absorb --modes eager --batches 1 32 --contexts 8192 $C --out $R/eager_$v.json \
    > $R/eager_$v.txt 2>&1
  echo "eager $v rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_$v.txt
done
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

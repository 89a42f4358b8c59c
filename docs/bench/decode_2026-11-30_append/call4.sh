#!/usr/bin/env bash
# session 2026-11-30g, call 4 on one H200 (issue 24): route_logits launch probe (packed-key top-k); the split kernel's
# sweep with TMA tiles and transposed scores; the step with the default and the swept launch
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_moe.py -k "cuda" > $R/pytest_cuda.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -2 $R/pytest_cuda.txt
timeout 90 python .gpu/route_probe.py $R/route_probe.json > $R/route_probe.txt 2>&1
echo "probe rc $? after $(( $(date +%s) - T0 )) s"; head -12 $R/route_probe.txt; grep "route_only\|b32_w4" $R/route_probe.txt
timeout 380 python scripts/bench/mla_decode_tune.py --shapes 32x32768 32x8192 --block-n 64 128 --warps 4 8 --stages 2 3 \
  --tma 0 1 --transposed 0 1 --variants mla_absorb mha --batches 32 --contexts 32768 --profile 3 --out $R/tune.json > $R/tune.txt 2>&1
echo "tune rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/tune.txt | grep -v Warn | head -60
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30g, call 6 on one H200 (issue 24): the split kernel's ranges cut from the whole batch (one per SM,
# 132 at batch 32 instead of 4 per sequence = 128); its sweep (the per-sequence count among the candidates); the step
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
C="--no-capacity --bandwidth 4.3"
timeout 100 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_moe.py -k "cuda" > $R/pytest_cuda.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -2 $R/pytest_cuda.txt
timeout 150 python scripts/bench/mla_decode_tune.py --no-step --shapes 32x32768 32x8192 1x32768 --block-n 64 128 --warps 4 8 \
  --stages 3 --tma 0 1 --out $R/tune.json > $R/tune.txt 2>&1
echo "tune rc $? after $(( $(date +%s) - T0 )) s"; grep -v Warn $R/tune.txt | head -40
timeout 220 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 $C --profile 3 --check --out $R/decode_new.json > $R/decode_new.txt 2>&1
echo "new rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_new.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
grep "_route_logits\|_mla_decode_split\|_mla_decode_merge" $R/decode_new.txt
timeout 80 python scripts/bench/bench_decode.py --variants mla_absorb --modes eager --batches 1 32 --contexts 8192 $C \
  --out $R/eager_new.json > $R/eager_new.txt 2>&1
echo "eager rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_new.txt
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

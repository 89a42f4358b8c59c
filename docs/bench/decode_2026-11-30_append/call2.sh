#!/usr/bin/env bash
# session 2026-11-30g, call 2 on one H200 (issue 24): the cache write kernel (append_latent) and the routing kernel
# (route_logits); the committed code before them (.gpu/old = git archive d5b37f3) in the same call
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
C="--no-capacity --bandwidth 4.3"
PYTHONPATH=/tmp/site:$PWD timeout 120 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_moe.py -k "cuda" > $R/pytest_cuda.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -3 $R/pytest_cuda.txt
PYTHONPATH=/tmp/site:$PWD timeout 200 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 $C --profile 3 --check --out $R/decode_new.json > $R/decode_new.txt 2>&1
echo "new rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_new.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
(cd .gpu/old && PYTHONPATH=/tmp/site:$PWD timeout 150 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled \
  --batches 32 --contexts 32768 $C --profile 3 --out $R/decode_old.json > $R/decode_old.txt 2>&1)
echo "old rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_old.txt | grep -v Warn | grep "compiled batch\|GPU kernels"
PYTHONPATH=/tmp/site:$PWD timeout 90 python scripts/bench/bench_decode.py --variants mla_absorb --modes eager --batches 1 32 --contexts 8192 $C \
  --out $R/eager_new.json > $R/eager_new.txt 2>&1
echo "eager rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_new.txt
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30g, call 7 on one H200 (issue 24): the committed decode step (append_latent, route_logits, TMA tiles with 8 warps)
# and the code before this session (.gpu/old = d5b37f3) in the same call
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
C="--no-capacity --bandwidth 4.3"
PYTHONPATH=/tmp/site:$PWD timeout 100 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_moe.py -k "cuda" > $R/pytest_cuda.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -2 $R/pytest_cuda.txt
PYTHONPATH=/tmp/site:$PWD timeout 200 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 $C --profile 3 --check --out $R/decode_new.json > $R/decode_new.txt 2>&1
echo "new rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_new.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
grep "_route_logits\|_mla_decode_split" $R/decode_new.txt
(cd .gpu/old && PYTHONPATH=/tmp/site:$PWD timeout 100 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled \
  --batches 32 --contexts 32768 $C --profile 3 --out $R/decode_old.json > $R/decode_old.txt 2>&1)
echo "old rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_old.txt | grep -v Warn | grep "compiled batch\|GPU kernels"
PYTHONPATH=/tmp/site:$PWD timeout 80 python scripts/bench/bench_decode.py --variants mla_absorb --modes eager --batches 1 32 --contexts 8192 $C \
  --out $R/eager_new.json > $R/eager_new.txt 2>&1
echo "eager rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_new.txt
(cd .gpu/old && PYTHONPATH=/tmp/site:$PWD timeout 80 python scripts/bench/bench_decode.py --variants mla_absorb --modes eager \
  --batches 1 32 --contexts 8192 $C --out $R/eager_old.json > $R/eager_old.txt 2>&1)
echo "eager old rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_old.txt
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

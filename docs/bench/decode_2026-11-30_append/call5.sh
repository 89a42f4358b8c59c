#!/usr/bin/env bash
# session 2026-11-30g, call 5 on one H200 (issue 24): the routing in one program (route_logits), the split kernel's
# tiles by TMA with 8 warps (default rule); the committed code before this session's changes (.gpu/old = d5b37f3)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
C="--no-capacity --bandwidth 4.3"
PYTHONPATH=/tmp/site:$PWD timeout 100 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_moe.py -k "cuda" > $R/pytest_cuda.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -2 $R/pytest_cuda.txt
PYTHONPATH=/tmp/site:$PWD timeout 60 python .gpu/route_probe.py $R/route_probe.json > $R/route_probe.txt 2>&1
echo "probe rc $? after $(( $(date +%s) - T0 )) s"; cat $R/route_probe.txt | tail -16
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
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# session 2026-11-30h, call 4 on one H200 (issue 24): a decode step's small projections (MLA down, folded query, o_proj,
# router + shared gate/up) through kernels/small_mm.py instead of cuBLAS; .gpu/old = git archive 369cb82 (call 3's code)
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
grep "_grouped_down\|_route_logits\|_mla_decode_split\|gemm\|Kernel" $R/decode_new.txt | head -20
(cd .gpu/old && PYTHONPATH=/tmp/site:$PWD timeout 100 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled \
  --batches 32 --contexts 32768 $C --profile 3 --out $R/decode_old.json > $R/decode_old.txt 2>&1)
echo "old rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode_old.txt | grep -v Warn | grep "compiled batch\|GPU kernels"
PYTHONPATH=/tmp/site:$PWD timeout 90 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled --batches 1 \
  --contexts 8192 $C --profile 3 --out $R/b1_new.json > $R/b1_new.txt 2>&1
echo "b1 new rc $? after $(( $(date +%s) - T0 )) s"; grep -v "^      " $R/b1_new.txt | grep "compiled batch\|GPU kernels"
(cd .gpu/old && PYTHONPATH=/tmp/site:$PWD timeout 90 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled \
  --batches 1 --contexts 8192 $C --profile 3 --out $R/b1_old.json > $R/b1_old.txt 2>&1)
echo "b1 old rc $? after $(( $(date +%s) - T0 )) s"; grep -v "^      " $R/b1_old.txt | grep "compiled batch\|GPU kernels"
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

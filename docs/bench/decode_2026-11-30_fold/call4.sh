#!/usr/bin/env bash
# session 2026-11-30f, call 4 on one H200 (issue 24): the committed folded-weights decode (b481b83), MLA vs MHA in one
# invocation; eager decode folded and unfolded in both orders (the first variant of a process measured slow in call 3)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dec; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
git log --oneline -1 > $R/commit.txt 2>/dev/null
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe.py -k "router or folded" > $R/pytest_router.txt 2>&1
echo "pytest rc $? after $(( $(date +%s) - T0 )) s"; tail -1 $R/pytest_router.txt
C="--no-capacity --bandwidth 4.3"
timeout 250 python scripts/bench/bench_decode.py --variants mla_absorb mha --modes compiled --batches 32 \
  --contexts 8192 32768 $C --profile 3 --check --out $R/decode.json > $R/decode.txt 2>&1
echo "compiled rc $? after $(( $(date +%s) - T0 )) s"
grep -v "^      " $R/decode.txt | grep -v Warn | grep "compiled batch\|GPU kernels\|diff"
for order in "mla_absorb_unfolded mla_absorb" "mla_absorb mla_absorb_unfolded"; do
  tag=${order%% *}
  timeout 100 python scripts/bench/bench_decode.py --variants $order --modes eager --batches 1 32 --contexts 8192 $C \
    --out $R/eager_first_$tag.json > $R/eager_first_$tag.txt 2>&1
  echo "eager ($order) rc $? after $(( $(date +%s) - T0 )) s"; grep "eager batch" $R/eager_first_$tag.txt
done
cd $OUT && tar czf dec.tgz dec && rm -rf dec
echo "total $(( $(date +%s) - T0 )) s"

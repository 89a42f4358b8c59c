#!/usr/bin/env bash
# session 2026-11-30e, call 2 (24): the generated code of the compiled MLA decode step, frozen and not: why the routing
# kernel takes 48 us per call when frozen (4 us otherwise)
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/dbg; mkdir -p $R
for v in frozen nofreeze; do
  flag=""; [ $v = nofreeze ] && flag="--no-freeze"
  TORCH_LOGS=output_code timeout 200 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled \
    --batches 32 --contexts 8192 --steps 10 --no-capacity --bandwidth 4.3 --profile 3 $flag --out $R/$v.json > $R/$v.log 2>&1
  echo "$v rc $? after $(( $(date +%s) - T0 )) s"; grep "ms/step" $R/$v.log
done
cd $OUT && tar czf dbg.tgz dbg && rm -rf dbg
echo "total $(( $(date +%s) - T0 )) s"

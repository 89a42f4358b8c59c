#!/usr/bin/env bash
# session 2026-11-30g, call 1 (issue 24): read-bandwidth ceiling; Inductor's output code of the folded decode step
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/info; mkdir -p $R
timeout 150 python .gpu/probe.py $R/probe.json > $R/probe.txt 2>&1; echo "probe rc $? $(( $(date +%s) - T0 )) s"; cat $R/probe.txt
TORCH_LOGS=output_code timeout 250 python scripts/bench/bench_decode.py --variants mla_absorb --modes compiled --batches 32 \
  --contexts 32768 --no-capacity --bandwidth 4.3 --profile 3 --out $R/decode.json > $R/decode.txt 2> $R/output_code.txt
echo "decode rc $? after $(( $(date +%s) - T0 )) s"
grep "compiled batch\|GPU kernels" $R/decode.txt
cd $OUT && tar czf info.tgz info && rm -rf info
echo "total $(( $(date +%s) - T0 )) s"

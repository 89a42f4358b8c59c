# 2026-12-01 session 6, call 4: the training-step benchmark at HEAD with both peers in one invocation
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) .whlpeer/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python -c "import torchtitan, importlib.metadata as m; print('torchtitan', m.version('torchtitan'))"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 560 python scripts/bench/bench_train.py --variants ours,ours_dense,hf_grouped_bf16_compile,tt_deepseek_v3,ours@regional \
  --compile-mode reduce-overhead --profile-steps 5 --timeout 170 --out $OUT/bench_train.json 2>&1 | tee $OUT/bench_train.txt | grep -v "^      "

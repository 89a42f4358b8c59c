#!/usr/bin/env bash
# session 2026-12-01b, call 4 on one H200 (issue 23): the router's top-k kernel against the sort on the GPU at the
# `small` step's size; then on one machine, 150-step runs of
# regional:reduce-overhead: 85f2ada (.gpu/base, session start) cold, this code cold, this code warm. Bytecode
# compiled once (compileall) for all. Small files only, in one archive.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whlgpu/*.whl | grep -v torchtitan) || exit 1
export PYTHONUNBUFFERED=1 DATA_ROOT=$PWD/.data PROJECT_ROOT=/tmp/dsm
R=$OUT/c4; mkdir -p $R /tmp/dsm
SP=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
PYTHONPYCACHEPREFIX=/tmp/pyc python -m compileall -q -j 16 $SP /tmp/site $PWD/deepseek_mini $PWD/.gpu/base/deepseek_mini > /dev/null 2>&1
export PYTHONPYCACHEPREFIX=/tmp/pyc
PYTHONPATH=/tmp/site:$PWD timeout 60 python - > $R/topk.log 2>&1 <<'PY'
import torch, time
from deepseek_mini.kernels import routing
g = torch.Generator(device="cuda").manual_seed(0)
bad = 0
for T, E, K in ((16384, 64, 6), (16384, 160, 6), (1000, 256, 8)):
    x = torch.randn(T, E, device="cuda", generator=g).softmax(-1)
    x[:64] = (x[:64] * 16).round() / 16  # ties
    want = x.sort(dim=-1, descending=True, stable=True).indices[:, :K]
    got = routing.top_k(x, K)
    bad += int((got != want).sum())
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(100): routing.top_k(x, K)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 100
    print(f"T={T} E={E} K={K}: mismatches {int((got != want).sum())}, {dt * 1e6:.1f} us per call")
print("total mismatches", bad)
PY
cat $R/topk.log
common="experiment=small_gpu data.max_chars=5000000 logger=csv callbacks.model_checkpoint=null trainer.limit_val_batches=5 trainer.val_check_interval=150 trainer.max_steps=150"
PYTHONPATH=/tmp/site:$PWD timeout 100 python train.py $common trainer.max_steps=1 compile=false logger=none hydra.run.dir=/tmp/prep > $R/prep.log 2>&1
echo "prep rc $? after $(( $(date +%s) - T0 )) s"; rm -rf /tmp/prep
one() {  # name, code dir
  local name=$1 code=$2
  local C=${KEEP_CACHE:-$(mktemp -d)} d=/tmp/runs/$name
  PYTHONPATH=/tmp/site:$code TORCHINDUCTOR_CACHE_DIR=$C/inductor TRITON_CACHE_DIR=$C/triton \
    timeout 140 python $code/train.py $common compile=regional:reduce-overhead hydra.run.dir=$d > $R/$name.log 2>&1
  echo "$name rc $? after $(( $(date +%s) - T0 )) s; $(grep -c AccumulateGrad $R/$name.log) stream warnings; $(find $C/triton -name '*.cubin' | wc -l) cubins"
  cp $d/results.json $R/${name}_results.json 2>/dev/null; rm -rf $d
  grep -E "first step after|tokens/s$|^val loss" $R/$name.log
  LAST_CACHE=$C
}
one base_cold $PWD/.gpu/base
one new_cold $PWD
KEEP_CACHE=$LAST_CACHE one new_warm $PWD
echo "total $(( $(date +%s) - T0 )) s"
tar -czf $OUT/c4.tgz -C $OUT c4 && rm -rf $R

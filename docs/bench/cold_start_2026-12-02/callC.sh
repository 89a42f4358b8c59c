# 2026-12-02, call C: regional compilation without CUDA graphs, whole blocks (this tree) and halves (099f749) alternating
# Trees: .gpu/base = git archive b175b2e (whole blocks), .gpu/split = git archive 099f749 (halves), the working tree
# = 099f749 + an uncommitted trial that compiled whole blocks without CUDA graphs and halves under them (so the
# halves in call A and in call B's graphed variant, whole blocks in B's and C-D's 'whole' runs); the trial was not kept.
# for this tree (halves only under graphs), 099f749 (halves always) and b175b2e (whole blocks always), one machine.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pyc
R=/tmp/cC; mkdir -p $R; ROOT=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
echo "setup $(( $(date +%s) - T0 )) s"
bench() {  # name, tree, variants
  (cd $2 && PYTHONPATH=/tmp/site:$2 timeout 250 python scripts/bench/bench_train.py --variants $3 --steps 30 --profile-steps 3 \
     --data $ROOT/.data/gutenberg_classics_train.txt.gz --val-data $ROOT/.data/gutenberg_classics_valid.txt \
     --cache-dir /tmp/bcache --timeout 150 --out $R/$1.json > $R/$1.txt 2>&1)
  echo "$1 rc $? after $(( $(date +%s) - T0 )) s"; grep -E "tok|RESULT|variant" $R/$1.txt | tail -6
  tar -czf $OUT/cC.tgz -C /tmp cC
}
bench whole1 $ROOT ours@default@regional
bench halves1 $ROOT/.gpu/split ours@default@regional
bench whole2 $ROOT ours@default@regional
bench halves2 $ROOT/.gpu/split ours@default@regional
echo "total $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# Multi-GPU measurement plan (issues 21 and 22), through the documented CLI only:
#   python train.py experiment=small_gpu trainer=ddp|fsdp|ep trainer.devices=2 ...
#
#   DATA_ROOT=<dir with gutenberg_classics_*> OUT=/tmp/mg bash scripts/bench/multi_gpu.sh     # 2 GPUs
#   MG_CPU=1 OUT=/tmp/mg bash scripts/bench/multi_gpu.sh      # CPU dry run: tiny preset, DDP = 2 gloo processes
#
# Stages (MG_STAGES, comma-separated; default all but the EP experiments, in this order):
#   prep    tokenizer + token caches, one process, into $CACHE (so no rank builds them)
#   gpu1    one-GPU baseline (trainer=gpu), the experiment's per-device batch, compile=$DDP_COMPILE -> runs/gpu1
#   gpu1_fast  one GPU with the experiment's own compile setting (small_gpu: regional:reduce-overhead, one GPU only);
#           MG_GPU1_PAIR=1 runs gpu1 and gpu1_fast at once (GPU 0 and GPU 1) to save time, at the price of a shared
#           host: on 2026-11-30 that may have understated gpu1's launch-bound rate (docs/benchmarks.md)
#   ddp     DDP on $NGPU GPUs, same per-device batch (weak scaling), compile=$DDP_COMPILE   -> runs/ddp
#   fsdp    FSDP on $NGPU GPUs, same per-device batch, compile=$FSDP_COMPILE (default regional) -> runs/fsdp
#   ddp_eager  DDP with compile=false
#   ep      expert parallelism (trainer=ep, EP=$NGPU; = experiment=ep_small_gpu), same per-device batch,
#           compile=$EP_COMPILE (default full:reduce-overhead, small_gpu's own; CUDA graphs need the padded
#           dispatch), trainer.strategy.dispatch=$EP_DISPATCH (default padded; exact needs EP_COMPILE=regional or
#           false); its like-for-like DDP reference: the ddp stage with the same compile setting (DDP_COMPILE)
#   resume_ddp / resume_fsdp   the equal-token runs: per-device batch BATCH / NGPU, so one step sees the one-GPU
#           run's samples (rank-strided from the same stream) and their val loss compares with gpu1's.
#           <p>_ref runs uninterrupted; <p>_kill is SIGKILLed at step $KILL_AT by the project's DSMINI_FAULT
#           hook (training/guards.py; every rank kills itself), then resumed with ckpt_path=last; the
#           train/loss sequence after the checkpoint step is compared. ddp_ref2 (a second uninterrupted DDP run)
#           measures run-to-run noise; fsdp_ref is compared with ddp_ref from step 1 (FSDP's clipping and
#           fp32 buffers against DDP's). Then the sharded checkpoint is consolidated and evaluated by eval.py.
#           The reference and killed runs of both run at once (MG_PARALLEL=1, the default), each on a master port
#           of its own: they are correctness runs, their speed is not reported. compile=$RESUME_COMPILE.
#   ep_limit  docs/results.md's device-limit experiment: experiment=ep_device_limit without the limit, with
#           M=1 and with M=1 + the device/communication losses, at once (correctness runs, not timed)
#   ep_big  experiment=ep_big_gpu (1024 experts, 10B parameters: more than DDP fits on one H200) for $BIG_STEPS
#   summary per-GPU tokens/s after the first window, scaling efficiency, memory, val loss, the comparisons
# Device calls limited to 10 minutes: run it in parts with the same CACHE, e.g.
#   MG_STAGES=gpu1,gpu1_fast,ddp,fsdp,ddp_eager,ep,summary   then   MG_STAGES=resume_ddp,resume_fsdp,ep_limit,summary
# DEADLINE (epoch seconds) caps every run so that the plan ends before it; a run that would get less than
# 45 s is skipped. Each run also has its own limit (RUN_TIMEOUT s), a failure never stops the plan, and
# everything a stage produced (results.json per run, metrics.csv, logs, comparisons, summary.json) is copied
# to $OUT as it finishes; the runs' checkpoints stay under $RUNS (default $OUT/runs; throughput runs delete theirs).
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-/tmp/multi_gpu}
RUNS=${RUNS:-$OUT/runs}
CACHE=${CACHE:-/tmp/dsm_cache}
NGPU=${NGPU:-2}
STAGES=${MG_STAGES:-prep,gpu1,gpu1_fast,ddp,fsdp,ddp_eager,ep,resume_ddp,resume_fsdp,summary}
PARALLEL=${MG_PARALLEL:-1}
mkdir -p "$OUT/runs" "$OUT/logs" "$RUNS"

if [ "${MG_CPU:-0}" = 1 ]; then
  # CPU dry run: the plan's logic with the tiny preset; DDP and EP = gloo processes; FSDP stages are skipped
  STEPS=${STEPS:-8}; VAL_EVERY=${VAL_EVERY:-4}; CKPT_EVERY=${CKPT_EVERY:-4}; KILL_AT=${KILL_AT:-6}
  RUN_TIMEOUT=${RUN_TIMEOUT:-300}; BATCH=${BATCH:-4}; BIG_STEPS=${BIG_STEPS:-4}
  EXP=tiny_cpu
  BASE=(model.vocab_size=512 model.max_position_embeddings=64 data.seq_len=32
        data.max_chars=200000 trainer.limit_val_batches=2 trainer.log_every_n_steps=2 scheduler.warmup_steps=2
        callbacks.samples=null callbacks.progress_bar=null logger=csv)
  ONE=(trainer.accelerator=cpu trainer.devices=1)
  DDP=(trainer=ddp trainer.accelerator=cpu "trainer.devices=$NGPU")
  EP=(trainer=ep trainer.accelerator=cpu "trainer.devices=$NGPU" "compile=${EP_COMPILE:-false}"
      "trainer.strategy.dispatch=${EP_DISPATCH:-exact}")
  FSDP=()
  DDP_COMPILE=false; FAST_COMPILE=false; RESUME_COMPILE=false
else
  STEPS=${STEPS:-150}; VAL_EVERY=${VAL_EVERY:-75}; CKPT_EVERY=${CKPT_EVERY:-50}; KILL_AT=${KILL_AT:-110}
  RUN_TIMEOUT=${RUN_TIMEOUT:-420}; BATCH=${BATCH:-16}; BIG_STEPS=${BIG_STEPS:-40}
  EXP=small_gpu
  BASE=(trainer.limit_val_batches=20 trainer.log_every_n_steps=10 "scheduler.warmup_steps=${WARMUP:-50}"
        logger=csv callbacks.samples=null callbacks.progress_bar=null)
  ONE=(trainer.devices=1)
  DDP=(trainer=ddp "trainer.devices=$NGPU")
  EP=(trainer=ep "trainer.devices=$NGPU" "compile=${EP_COMPILE:-full:reduce-overhead}"  # = experiment=ep_small_gpu
      "trainer.strategy.dispatch=${EP_DISPATCH:-padded}")
  # FSDP_COMPILE: the fsdp stage's compile setting. CUDA graphs are refused under FSDP; regional is its fastest
  # measured setting (2026-11-30: 1.73x FSDP eager, same loss curve; docs/benchmarks.md)
  FSDP=(trainer=fsdp "trainer.devices=$NGPU" "compile=${FSDP_COMPILE:-regional}")
  # One compile setting for the baseline and DDP, so the scaling figure compares like with like: small_gpu's
  # own, the whole model with CUDA graphs, which DDP compiles as one graph (training/compile.OneGraphUnderDDP;
  # 2026-11-30: the fastest DDP setting, on the eager DDP loss curve; docs/benchmarks.md)
  DDP_COMPILE=${DDP_COMPILE:-full:reduce-overhead}   # retried with compile=false if the run fails (unless DDP_FALLBACK=0)
  FAST_COMPILE=${FAST_COMPILE:-}         # empty: the experiment's own setting
  # the resume comparisons are about the checkpointed state: eager kernels, no compile-time autotuning
  RESUME_COMPILE=${RESUME_COMPILE:-false}
fi
COMMON=("experiment=$EXP" "${BASE[@]}" "paths.cache_dir=$CACHE" "trainer.max_steps=$STEPS"
        "trainer.val_check_interval=$VAL_EVERY")
HALF=$(( BATCH / NGPU > 0 ? BATCH / NGPU : 1 ))
PORT=${MASTER_PORT:-29500}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/plan.log"; }
next_port() { PORT=$(( PORT + 7 )); }

mem_start() {  # nvidia-smi samples every GPU's memory.used while a run goes (concurrent runs share the GPUs)
  if command -v nvidia-smi >/dev/null 2>&1 && [ "${MG_CPU:-0}" != 1 ]; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/mem_$1.csv" 2>/dev/null &
    echo $!
  fi
}

save() {  # copy what a run left (results.json, metrics.csv) to $OUT, whatever its state
  local name=$1 dir=$RUNS/$1
  [ -f "$dir/results.json" ] && cp "$dir/results.json" "$OUT/results_$name.json"
  [ -f "$dir/csv/metrics.csv" ] && cp "$dir/csv/metrics.csv" "$OUT/metrics_$name.csv"
  mkdir -p "$OUT/runs/$1"
  return 0
}

limit_for() {  # the run's time limit: RUN_TIMEOUT, or less to end before DEADLINE; 0 = no time left
  local lim=$RUN_TIMEOUT
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$lim" ] && lim=$left
  fi
  [ "$lim" -lt 45 ] && lim=0
  echo "$lim"
}

train() {  # train NAME [ENV=...] -- overrides...: one run in its own dir, time-limited, never fatal
  local name=$1; shift
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local lim; lim=$(limit_for)
  if [ "$lim" = 0 ]; then log "train $name: skipped (DEADLINE)"; return 124; fi
  log "train $name (limit ${lim}s): ${envs[*]} $PY train.py $*"
  local mem; mem=$(mem_start "$name")
  local t0=$SECONDS
  env "${envs[@]}" WANDB_MODE=offline timeout --signal=TERM --kill-after=30 "$lim" \
    "$PY" train.py "$@" "hydra.run.dir=$RUNS/$name" >> "$OUT/logs/$name.log" 2>&1
  local rc=$?
  if [ -n "$mem" ]; then kill "$mem" 2>/dev/null; wait "$mem" 2>/dev/null; fi
  log "train $name: exit $rc after $(( SECONDS - t0 )) s"
  save "$name"
  return $rc
}

drop_checkpoints() {  # throughput runs: their checkpoints are not needed and the disk is shared
  rm -rf "$RUNS/$1/checkpoints/"*.ckpt "$RUNS/$1/checkpoints/"*.consolidated 2>/dev/null
  return 0
}

if has prep; then
  log "prep: token caches into $CACHE"
  timeout "$RUN_TIMEOUT" "$PY" scripts/bench/multi_gpu.py prepare "${COMMON[@]}" > "$OUT/logs/prep.log" 2>&1
  log "prep: exit $?"
fi
PREP_EP=""
if has ep_limit; then  # the device-limit experiment's own tokenizer and caches, built while other stages run
  log "prep_ep_limit: token caches of experiment=ep_device_limit into $CACHE (in the background)"
  timeout "$RUN_TIMEOUT" "$PY" scripts/bench/multi_gpu.py prepare experiment=ep_device_limit \
    "paths.cache_dir=$CACHE" ${MG_CPU:+data.max_chars=200000} > "$OUT/logs/prep_ep_limit.log" 2>&1 &
  PREP_EP=$!
fi

# ---------------------------------------------------------------- throughput runs (one at a time)
FAST=("${COMMON[@]}" "${ONE[@]}" "data.batch_size=$BATCH")
[ -n "$FAST_COMPILE" ] && FAST+=("compile=$FAST_COMPILE")
if has gpu1 && has gpu1_fast && [ "${MG_GPU1_PAIR:-0}" = 1 ] && [ "$NGPU" -ge 2 ] && [ "${MG_CPU:-0}" != 1 ]; then
  log "gpu1 on GPU 0 and gpu1_fast on GPU 1, at once"
  train gpu1 CUDA_VISIBLE_DEVICES=0 -- "${COMMON[@]}" "${ONE[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE" &
  p1=$!
  train gpu1_fast CUDA_VISIBLE_DEVICES=1 -- "${FAST[@]}" &
  wait $p1 $!
  drop_checkpoints gpu1; drop_checkpoints gpu1_fast
else
  if has gpu1; then
    train gpu1 -- "${COMMON[@]}" "${ONE[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE"; drop_checkpoints gpu1
  fi
  if has gpu1_fast; then train gpu1_fast -- "${FAST[@]}"; drop_checkpoints gpu1_fast; fi
fi

if has ddp; then
  if ! train ddp -- "${COMMON[@]}" "${DDP[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE" \
      && [ "$DDP_COMPILE" != false ] && [ "${DDP_FALLBACK:-1}" = 1 ] && [ "$(limit_for)" != 0 ]; then
    log "ddp with compile=$DDP_COMPILE failed: see logs/ddp_compile.log; retrying with compile=false"
    mv "$OUT/logs/ddp.log" "$OUT/logs/ddp_compile.log"
    rm -rf "${RUNS:?}/ddp"
    DDP_COMPILE=false
    train ddp -- "${COMMON[@]}" "${DDP[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE"
  fi
  drop_checkpoints ddp
fi

if has fsdp; then
  if [ ${#FSDP[@]} -eq 0 ]; then
    log "fsdp: skipped (FSDP needs CUDA GPUs)"
  else
    train fsdp -- "${COMMON[@]}" "${FSDP[@]}" "data.batch_size=$BATCH"; drop_checkpoints fsdp
  fi
fi

if has ddp_eager; then
  train ddp_eager -- "${COMMON[@]}" "${DDP[@]}" "data.batch_size=$BATCH" compile=false; drop_checkpoints ddp_eager
fi

if has ep; then
  train ep -- "${COMMON[@]}" "${EP[@]}" "data.batch_size=$BATCH"; drop_checkpoints ep
fi

# ---------------------------------------------------------------- the device-limit experiment (correctness runs)
# Launched in the background here, so that its three small runs overlap the resume runs and ep_big below
# (none of them is timed); the table is printed once they finish.
LIMIT_PIDS=()
if has ep_limit; then
  [ -n "$PREP_EP" ] && wait "$PREP_EP"
  log "prep_ep_limit: done"
  LIM=(experiment=ep_device_limit logger=csv "paths.cache_dir=$CACHE")
  [ "${MG_CPU:-0}" = 1 ] && LIM+=(trainer.accelerator=cpu trainer.max_steps=4 trainer.val_check_interval=2
                                  trainer.limit_val_batches=2 data.seq_len=32 data.batch_size=4 data.max_chars=200000)
  M1=(model.topk_method=group_limited_greedy model.topk_group=1)
  next_port; train limit_none "MASTER_PORT=$PORT" -- "${LIM[@]}" & LIMIT_PIDS+=($!)
  next_port; train limit_m1 "MASTER_PORT=$PORT" -- "${LIM[@]}" "${M1[@]}" & LIMIT_PIDS+=($!)
  next_port; train limit_m1_losses "MASTER_PORT=$PORT" -- "${LIM[@]}" "${M1[@]}" \
    model.device_aux_loss_alpha=0.05 model.comm_aux_loss_alpha=0.02 & LIMIT_PIDS+=($!)
  [ "$PARALLEL" = 1 ] || wait "${LIMIT_PIDS[@]}"
fi

# ---------------------------------------------------------------- resume and parity runs (correctness, not timed)
resume_step_of() {  # the global step recorded in a run's last.ckpt (file or sharded directory), 0 if none
  "$PY" -c "
from pathlib import Path; import sys
from deepseek_mini.training.checkpoint_io import read_checkpoint_meta
p = Path(sys.argv[1])
print(read_checkpoint_meta(p).get('global_step', 0) if p.exists() else 0)" "$RUNS/$1/checkpoints/last.ckpt" 2>/dev/null || echo 0
}

PAIRS=()
has resume_ddp && PAIRS+=(ddp)
has resume_fsdp && [ ${#FSDP[@]} -gt 0 ] && PAIRS+=(fsdp)
has resume_fsdp && [ ${#FSDP[@]} -eq 0 ] && log "resume_fsdp: skipped (FSDP needs CUDA GPUs)"
pair_args() {  # pair_args ddp|fsdp: the equal-token run's overrides, into ARGS
  if [ "$1" = ddp ]; then ARGS=("${COMMON[@]}" "${DDP[@]}" "compile=$RESUME_COMPILE"); else ARGS=("${COMMON[@]}" "${FSDP[@]}"); fi
  ARGS+=("data.batch_size=$HALF" "callbacks.model_checkpoint.every_n_train_steps=$CKPT_EVERY"
         callbacks.model_checkpoint.save_top_k=0)   # last.ckpt only: five runs share the disk
}
if [ ${#PAIRS[@]} -gt 0 ]; then
  pids=()
  launch() {  # launch NAME ENV... -- args: at once (MG_PARALLEL=1, a master port each) or one after another
    local name=$1; shift
    next_port
    if [ "$PARALLEL" = 1 ]; then train "$name" "MASTER_PORT=$PORT" "$@" & pids+=($!); else train "$name" "MASTER_PORT=$PORT" "$@"; fi
  }
  for p in "${PAIRS[@]}"; do
    pair_args "$p"
    launch "${p}_ref" -- "${ARGS[@]}"
    [ "$p" = ddp ] && launch ddp_ref2 -- "${ARGS[@]}"
    launch "${p}_kill" "DSMINI_FAULT=kill_at_step:$KILL_AT" -- "${ARGS[@]}"
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  pids=()
  for p in "${PAIRS[@]}"; do
    log "${p}_kill: its exit status above is expected to be a kill (137 / -9); its checkpoints:"
    ls -la "$RUNS/${p}_kill/checkpoints" 2>&1 | tee -a "$OUT/plan.log"
    step=$(resume_step_of "${p}_kill"); echo "$step" > "$OUT/resume_step_$p"
    log "${p}_kill: last.ckpt at step $step; resuming with ckpt_path=last"
    pair_args "$p"
    # the resumed run writes into the killed run's dir; results_<p>_kill.json is then the resumed run's
    launch "${p}_kill" -- "${ARGS[@]}" ckpt_path=last
  done
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
  for p in "${PAIRS[@]}"; do
    "$PY" scripts/bench/multi_gpu.py compare "$RUNS/${p}_ref" "$RUNS/${p}_kill" "$(cat "$OUT/resume_step_$p")" \
      > "$OUT/compare_${p}_resume.json" 2>>"$OUT/plan.log"
    log "compare ${p} resume: $(cat "$OUT/compare_${p}_resume.json" 2>/dev/null)"
  done
  if has resume_ddp; then
    "$PY" scripts/bench/multi_gpu.py compare "$RUNS/ddp_ref" "$RUNS/ddp_ref2" 0 > "$OUT/compare_ddp_rerun.json" 2>>"$OUT/plan.log"
    log "compare ddp rerun (run-to-run noise): $(cat "$OUT/compare_ddp_rerun.json" 2>/dev/null)"
  fi
  if [[ " ${PAIRS[*]} " == *" fsdp "* ]] && has resume_ddp; then
    "$PY" scripts/bench/multi_gpu.py compare "$RUNS/ddp_ref" "$RUNS/fsdp_ref" 0 > "$OUT/compare_fsdp_vs_ddp.json" 2>>"$OUT/plan.log"
    log "compare fsdp vs ddp (same samples, same steps): $(cat "$OUT/compare_fsdp_vs_ddp.json" 2>/dev/null)"
  fi
  SHARDED=$RUNS/fsdp_kill/checkpoints/last.ckpt
  if [[ " ${PAIRS[*]} " == *" fsdp "* ]]; then
    if [ -d "$SHARDED" ]; then
      rm -f "$SHARDED.consolidated"
      log "consolidate $SHARDED"
      timeout "$RUN_TIMEOUT" "$PY" -c "from deepseek_mini.training.strategies import consolidate_checkpoint as c; print(c('$SHARDED'))" \
        > "$OUT/logs/consolidate.log" 2>&1
      log "consolidate: exit $?"
      timeout "$RUN_TIMEOUT" "$PY" eval.py "ckpt_path=$SHARDED.consolidated" "paths.cache_dir=$CACHE" \
        "hydra.run.dir=$OUT/eval_fsdp" > "$OUT/logs/eval_fsdp.log" 2>&1
      log "eval.py on the consolidated checkpoint: exit $?"
    else
      log "resume_fsdp: no sharded $SHARDED to consolidate"
    fi
  fi
fi

# ---------------------------------------------------------------- expert parallelism beyond one GPU's memory
if has ep_big; then
  BIG=(experiment=ep_big_gpu logger=csv "paths.cache_dir=$CACHE" "trainer.max_steps=$BIG_STEPS"
       "trainer.val_check_interval=$BIG_STEPS" trainer.log_every_n_steps=10 scheduler.warmup_steps=10
       trainer.limit_val_batches=5)
  [ "${MG_CPU:-0}" = 1 ] && BIG=("${COMMON[@]}" "${EP[@]}" "trainer.max_steps=$BIG_STEPS" model.n_routed_experts=64)
  train ep_big -- "${BIG[@]}"
fi

if [ ${#LIMIT_PIDS[@]} -gt 0 ]; then
  wait "${LIMIT_PIDS[@]}"
  "$PY" scripts/bench/multi_gpu.py device_limit "$OUT" limit_none limit_m1 limit_m1_losses 2>&1 | tee "$OUT/device_limit.txt"
fi

if has summary; then
  "$PY" scripts/bench/multi_gpu.py summary "$OUT" 2>&1 | tee "$OUT/summary.txt"
fi
log "done; everything is under $OUT"

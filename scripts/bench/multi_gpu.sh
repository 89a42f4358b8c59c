#!/usr/bin/env bash
# Multi-GPU measurement plan (issue 21), through the documented CLI only:
#   python train.py experiment=small_gpu trainer=ddp|fsdp trainer.devices=2 ...
#
#   DATA_ROOT=<dir with gutenberg_classics_*> OUT=/tmp/mg bash scripts/bench/multi_gpu.sh     # 2 GPUs
#   MG_CPU=1 OUT=/tmp/mg bash scripts/bench/multi_gpu.sh      # CPU dry run: tiny preset, DDP = 2 gloo processes
#
# Stages (MG_STAGES, comma-separated; default all, in this order):
#   prep    tokenizer + token caches, one process, into $CACHE (so no rank builds them)
#   gpu1    one-GPU baseline (trainer=gpu), the experiment's per-device batch, compile=$DDP_COMPILE -> runs/gpu1
#   ddp     DDP on $NGPU GPUs, same per-device batch (weak scaling)                  -> runs/ddp
#   fsdp    FSDP on $NGPU GPUs, same per-device batch, compile off                   -> runs/fsdp
#   resume_ddp   the equal-token runs: per-device batch BATCH / NGPU, so one step sees the one-GPU run's
#           samples (rank-strided from the same stream): their val loss is comparable with gpu1's. ddp_ref runs uninterrupted; ddp_kill is SIGKILLed at step
#           $KILL_AT by the project's DSMINI_FAULT hook (training/guards.py; every rank kills itself), then
#           resumed with ckpt_path=last; the train/loss sequence after the checkpoint step is compared
#   resume_fsdp  the same with trainer=fsdp (sharded last.ckpt/ directory), then the checkpoint is
#           consolidated (Lightning's consolidate_checkpoint) and eval.py evaluates it
#   summary per-GPU tokens/s after the first window, scaling efficiency, memory, val loss, resume comparisons
# Device calls limited to 10 minutes: run it in parts with the same CACHE, e.g. MG_STAGES=prep,gpu1,ddp,fsdp,summary
# and then MG_STAGES=resume_ddp,resume_fsdp,summary (the summary covers the runs under that call's OUT).
# Each run has a time limit (RUN_TIMEOUT s), a failure never stops the plan, and everything a stage produced
# (results.json per run, metrics.csv, logs, comparisons, summary.json) is copied to $OUT as it finishes.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-python}
OUT=${OUT:-/tmp/multi_gpu}
CACHE=${CACHE:-/tmp/dsm_cache}
NGPU=${NGPU:-2}
STAGES=${MG_STAGES:-prep,gpu1,ddp,fsdp,resume_ddp,resume_fsdp,summary}
mkdir -p "$OUT/runs" "$OUT/logs"

if [ "${MG_CPU:-0}" = 1 ]; then
  # CPU dry run: the plan's logic with the tiny preset; DDP = gloo processes; FSDP stages are skipped
  STEPS=${STEPS:-8}; VAL_EVERY=${VAL_EVERY:-4}; CKPT_EVERY=${CKPT_EVERY:-4}; KILL_AT=${KILL_AT:-6}
  RUN_TIMEOUT=${RUN_TIMEOUT:-300}; BATCH=${BATCH:-4}
  BASE=(experiment=tiny_cpu model.vocab_size=512 model.max_position_embeddings=64 data.seq_len=32
        data.max_chars=200000 trainer.limit_val_batches=2 trainer.log_every_n_steps=2 scheduler.warmup_steps=2
        callbacks.samples=null callbacks.progress_bar=null logger=csv compile=false)
  ONE=(trainer.accelerator=cpu trainer.devices=1)
  DDP=(trainer=ddp trainer.accelerator=cpu "trainer.devices=$NGPU")
  FSDP=()
  DDP_COMPILE=false
else
  STEPS=${STEPS:-300}; VAL_EVERY=${VAL_EVERY:-100}; CKPT_EVERY=${CKPT_EVERY:-100}; KILL_AT=${KILL_AT:-150}
  RUN_TIMEOUT=${RUN_TIMEOUT:-420}; BATCH=${BATCH:-16}
  BASE=(experiment=small_gpu trainer.limit_val_batches=20 trainer.log_every_n_steps=10 logger=csv
        callbacks.samples=null callbacks.progress_bar=null)
  ONE=(trainer.devices=1)
  DDP=(trainer=ddp "trainer.devices=$NGPU")
  FSDP=(trainer=fsdp "trainer.devices=$NGPU" compile=false)   # README: keep compile off with FSDP
  # One compile setting for the baseline and DDP, so the scaling figure compares like with like. Regional:
  # on two H200s (2026-11-29) DDP with a whole-model compile (default mode or reduce-overhead) had not reached
  # its first step 150 s after validation (a cold backward compile on both ranks; docs/benchmarks.md).
  DDP_COMPILE=${DDP_COMPILE:-regional}   # retried with compile=false if the run fails
fi
COMMON=("${BASE[@]}" "paths.cache_dir=$CACHE" "trainer.max_steps=$STEPS" "trainer.val_check_interval=$VAL_EVERY")
HALF=$(( BATCH / NGPU > 0 ? BATCH / NGPU : 1 ))
has() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/plan.log"; }

MEM_PID=""
mem_start() {  # nvidia-smi samples every GPU's memory.used while a run goes
  MEM_PID=""
  if command -v nvidia-smi >/dev/null 2>&1 && [ "${MG_CPU:-0}" != 1 ]; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/mem_$1.csv" 2>/dev/null &
    MEM_PID=$!
  fi
}
mem_stop() { if [ -n "$MEM_PID" ]; then kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null; fi; MEM_PID=""; }

save() {  # copy what a run left (results.json, metrics.csv, its config) to $OUT, whatever its state
  local name=$1 dir=$OUT/runs/$1
  [ -f "$dir/results.json" ] && cp "$dir/results.json" "$OUT/results_$name.json"
  [ -f "$dir/csv/metrics.csv" ] && cp "$dir/csv/metrics.csv" "$OUT/metrics_$name.csv"
  return 0
}

train() {  # train NAME [ENV=...] -- overrides...: one run in its own dir, time-limited, never fatal
  local name=$1; shift
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  log "train $name: ${envs[*]} $PY train.py $*"
  mem_start "$name"
  local t0=$SECONDS
  env "${envs[@]}" WANDB_MODE=offline timeout --signal=TERM --kill-after=60 "$RUN_TIMEOUT" \
    "$PY" train.py "$@" "hydra.run.dir=$OUT/runs/$name" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  mem_stop
  log "train $name: exit $rc after $(( SECONDS - t0 )) s"
  save "$name"
  return $rc
}

if has prep; then
  log "prep: token caches into $CACHE"
  timeout "$RUN_TIMEOUT" "$PY" scripts/bench/multi_gpu.py prepare "${COMMON[@]}" > "$OUT/logs/prep.log" 2>&1
  log "prep: exit $?"
fi

if has gpu1; then
  train gpu1 -- "${COMMON[@]}" "${ONE[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE"
fi

if has ddp; then
  if ! train ddp -- "${COMMON[@]}" "${DDP[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE" && [ "$DDP_COMPILE" != false ]; then
    log "ddp with compile=$DDP_COMPILE failed: see logs/ddp_compile.log; retrying with compile=false"
    mv "$OUT/logs/ddp.log" "$OUT/logs/ddp_compile.log"
    rm -rf "$OUT/runs/ddp"
    DDP_COMPILE=false
    train ddp -- "${COMMON[@]}" "${DDP[@]}" "data.batch_size=$BATCH" "compile=$DDP_COMPILE"
  fi
fi

if has fsdp; then
  if [ ${#FSDP[@]} -eq 0 ]; then
    log "fsdp: skipped (FSDP needs CUDA GPUs)"
  else
    train fsdp -- "${COMMON[@]}" "${FSDP[@]}" "data.batch_size=$BATCH"
  fi
fi

resume_pair() {  # resume_pair PREFIX overrides...: uninterrupted reference, killed run, its resume, comparison
  local p=$1; shift
  local args=("${COMMON[@]}" "$@" "data.batch_size=$HALF" "callbacks.model_checkpoint.every_n_train_steps=$CKPT_EVERY")
  train "${p}_ref" -- "${args[@]}"
  train "${p}_kill" "DSMINI_FAULT=kill_at_step:$KILL_AT" -- "${args[@]}"
  log "${p}_kill: exit status above is expected to be a kill (137 / -9); its checkpoints:"
  ls -la "$OUT/runs/${p}_kill/checkpoints" 2>&1 | tee -a "$OUT/plan.log"
  local resume_step
  resume_step=$("$PY" -c "
from pathlib import Path; import sys
from deepseek_mini.training.checkpoint_io import read_checkpoint_meta
p = Path(sys.argv[1])
print(read_checkpoint_meta(p).get('global_step', 0) if p.exists() else 0)" "$OUT/runs/${p}_kill/checkpoints/last.ckpt" 2>/dev/null || echo 0)
  log "${p}_kill: last.ckpt at step $resume_step; resuming with ckpt_path=last"
  # the resumed run writes into the killed run's dir; results_<p>_kill.json is then the resumed run's
  train "${p}_kill" -- "${args[@]}" ckpt_path=last
  "$PY" scripts/bench/multi_gpu.py compare "$OUT/runs/${p}_ref" "$OUT/runs/${p}_kill" "$resume_step" \
    > "$OUT/compare_${p}.json" 2>>"$OUT/plan.log"
  log "compare ${p}: $(cat "$OUT/compare_${p}.json" 2>/dev/null)"
}

if has resume_ddp; then
  resume_pair ddp "${DDP[@]}" "compile=$DDP_COMPILE"
fi

if has resume_fsdp; then
  if [ ${#FSDP[@]} -eq 0 ]; then
    log "resume_fsdp: skipped (FSDP needs CUDA GPUs)"
  else
    resume_pair fsdp "${FSDP[@]}"
    SHARDED=$OUT/runs/fsdp_kill/checkpoints/last.ckpt
    if [ -d "$SHARDED" ]; then
      rm -f "$SHARDED.consolidated"
      log "consolidate $SHARDED"
      timeout "$RUN_TIMEOUT" "$PY" -m lightning.pytorch.utilities.consolidate_checkpoint "$SHARDED" \
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

if has summary; then
  "$PY" scripts/bench/multi_gpu.py summary "$OUT" 2>&1 | tee "$OUT/summary.txt"
fi
log "done; everything is under $OUT"

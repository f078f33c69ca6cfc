#!/usr/bin/env bash
# Training throughput and the student's MFU on one GPU: regnety_160 -> deit_tiny, 224 px, bf16.
#
#   bash bench/gpu.sh                 on the GPU machine (H100/H200; no internet needed)
#   DRY=1 bash bench/gpu.sh           on CPU, to prove the script: tiny sizes, a few steps, fp32
#
# 1. bench/gpu_throughput.py (see its docstring): plain training, online KD (live teacher) and
#    cached KD (logits from a replay cache), each with and without torch.compile, kdkit's own
#    train_step on batches staged in pinned memory: steady-state images/s, student MFU.
#    -> bench/results/gpu_throughput.json
# 2. E2E=1 also: the same three through kdkit's CLI (kdkit train / kdkit cache + distill --logit-cache /
#    distill --teacher) for one epoch with --set run.compile=false|true, data loader included;
#    steady-state images/s from each run's metrics.jsonl. -> bench/results/gpu_e2e.json
#    (adds several minutes: run it as a second command, SKIP_PY=1 E2E=1, if time is short.)
# 3. bench/finish_on_device.py: DeiT's training views finished on the GPU (the trainer's default
#    there) against the same batches finished on the CPU: largest difference, time per batch.
#    -> bench/results/finish_on_device.json (SKIP_FINISH=1 skips it; needs part 1's data)
#
# Data: made on the machine under $WORK/data (4096 train + 1000 val JPEGs of 500x375, 1000 classes)
# from CIFAR-10 images upscaled, read from the first tarball found among /work/shared/data/,
# runs/ and shared/data/ (cifar10-jpg.tar.gz), else synthetic. To carry the tarball to a device
# machine as an ignored path, here: mkdir -p runs && cp /work/shared/data/cifar10-jpg.tar.gz runs/
# and name runs/cifar10-jpg.tar.gz in the run's carry. Teacher weights: random, saved locally.
#
# Environment: PY (python; default .venv/bin/python if present, else python3), WORK
# (/tmp/kdkit-gpu-bench), BATCH (256), WORKERS (min(cores, 16)), MODES ("plain online cached"),
# COMPILE (both | on | off; DRY=1 defaults to off: DRY=1 COMPILE=both proves compile too), E2E (0 | 1), SKIP_PY (0 | 1), SKIP_FINISH (0 | 1), PY_TIMEOUT (seconds for part 1, 480),
# E2E_TIMEOUT (seconds per CLI run, 240), EXTRA (more flags for gpu_throughput.py).
# When $OUT is set (the device tool), the JSON results and logs are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=${DRY:-0}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/kdkit-gpu-bench}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}
MODES=${MODES:-plain online cached}
COMPILE=${COMPILE:-$([ "$DRY" = 1 ] && echo off || echo both)}  # dry-run: off unless asked (CPU inductor is slow)
E2E=${E2E:-0}
SKIP_PY=${SKIP_PY:-0}
SKIP_FINISH=${SKIP_FINISH:-0}
PY_TIMEOUT=${PY_TIMEOUT:-480}
E2E_TIMEOUT=${E2E_TIMEOUT:-240}
RESULTS=bench/results
mkdir -p "$RESULTS" "$WORK"
status=0

"$PY" - <<'EOF' || { echo "error: $PY cannot import torch/timm/accelerate"; exit 1; }
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
import timm, accelerate; print(f"timm {timm.__version__}  accelerate {accelerate.__version__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader

if [ "$DRY" = 1 ]; then
  DRYFLAG=--dry-run; SUFFIX=_dryrun; BATCH=8; WORK=$WORK-dryrun
  TEACHER=regnety_002; SIZE=(--img-size 32 --patch-size 4); PRECISION=no; CLASSES=10
else
  DRYFLAG=; SUFFIX=; TEACHER=regnety_160; SIZE=(); PRECISION=bf16; CLASSES=1000
fi
mkdir -p "$WORK"
PY_JSON=$RESULTS/gpu_throughput$SUFFIX.json
echo "== bench/gpu.sh $(date -u +%FT%TZ) DRY=$DRY BATCH=$BATCH WORKERS=$WORKERS MODES='$MODES' COMPILE=$COMPILE E2E=$E2E"

# --- 1. kdkit's train_step, steady state ------------------------------------------------------------
if [ "$SKIP_PY" != 1 ]; then
  # shellcheck disable=SC2086
  timeout --kill-after=20 "$PY_TIMEOUT" "$PY" bench/gpu_throughput.py $DRYFLAG --work "${WORK%-dryrun}" \
      --batch-size "$BATCH" --workers "$WORKERS" --modes $MODES --compile "$COMPILE" --json "$PY_JSON" \
      ${EXTRA:-} > "$WORK/gpu_throughput.stdout" 2> >(tee "$WORK/gpu_throughput.log" >&2)
  rc=$?
  [ $rc -ne 0 ] && { echo "gpu_throughput.py exited $rc (124: past PY_TIMEOUT=$PY_TIMEOUT s; partial rows are in $PY_JSON)"; status=$rc; }
  tail -c 20000 "$WORK/gpu_throughput.stdout"; echo
fi

# --- 2. the CLI end to end (optional) ---------------------------------------------------------------
if [ "$E2E" = 1 ]; then
  DATA=$WORK/data
  WEIGHTS=$WORK/$TEACHER-$CLASSES-random.safetensors
  if [ ! -f "$DATA/.complete" ] || [ ! -f "$WEIGHTS" ]; then  # part 1 makes both; make them if it was skipped
    # shellcheck disable=SC2086
    "$PY" bench/gpu_throughput.py $DRYFLAG --work "${WORK%-dryrun}" --modes plain --compile off --warmup 0 \
        --steps 1 --windows 1 --json "$WORK/prepare.json" > /dev/null 2> "$WORK/prepare.log" || { cat "$WORK/prepare.log"; exit 1; }
  fi
  RUNS=$WORK/cli-runs
  rm -rf "$RUNS" "$WORK/cli-cache"
  # what decides the views (the cache is refused unless it matches), shared by kdkit cache and the runs
  BASE=(--recipe deit_tiny_imagenet --data "$DATA" --epochs 1 --batch-size "$BATCH" --workers "$WORKERS"
        --precision "$PRECISION" "${SIZE[@]}" --no-progress --set aug.repeated_aug=0 --set data.eval_batch_size=256)
  COMMON=("${BASE[@]}" --output "$RUNS" --set run.log_every=1 --set run.eval_every=0 --set run.checkpoint_every=0
          --set run.keep_checkpoints=0 --set run.teacher_check_batches=1)
  DISTILL=(--teacher "$TEACHER" --teacher-weights "$WEIGHTS" --student deit_tiny)
  e2e() {  # name, then the kdkit command line
    local name=$1; shift
    echo "-- $name: kdkit $*" | cut -c1-400
    timeout --kill-after=20 "$E2E_TIMEOUT" "$PY" -m kdkit "$@" > "$WORK/$name.log" 2>&1 \
      || { echo "   failed ($?): tail of $WORK/$name.log"; tail -n 15 "$WORK/$name.log"; status=1; }
  }
  # the cache holds epoch 0 of the same views (the CLI checks them): written once, read by both compile settings
  e2e cache cache "${DISTILL[@]}" "${BASE[@]}" --out "$WORK/cli-cache"
  case $COMPILE in on) CS="true";; off) CS="false";; *) CS="false true";; esac
  dirs=()
  for c in $CS; do
    for m in $MODES; do
      case $m in
        plain)  e2e "plain-compile-$c" train --model deit_tiny "${COMMON[@]}" --name "plain-compile-$c" --set run.compile=$c ;;
        online) e2e "online-compile-$c" distill "${DISTILL[@]}" "${COMMON[@]}" --name "online-compile-$c" --set run.compile=$c ;;
        cached) e2e "cached-compile-$c" distill --logit-cache "$WORK/cli-cache" "${DISTILL[@]}" "${COMMON[@]}" \
                    --name "cached-compile-$c" --set run.compile=$c ;;
      esac
      dirs+=("$RUNS/$m-compile-$c")
    done
  done
  "$PY" bench/gpu_throughput.py --summarize-runs "${dirs[@]}" --batch-size "$BATCH" --flops-from "$PY_JSON" \
      --json "$RESULTS/gpu_e2e$SUFFIX.json" || status=1
fi

# --- 3. views finished on the GPU against the loader workers' (data.prefetcher; kdkit.data.batch) ----
if [ "$SKIP_FINISH" != 1 ] && [ -d "$WORK/data/train" ]; then
  if [ "$DRY" = 1 ]; then FSIZE=(--size 32 --batch 8 --batches 2); else FSIZE=(--batch "$BATCH"); fi
  timeout 120 "$PY" bench/finish_on_device.py --data "$WORK/data" "${FSIZE[@]}" \
      --json "$RESULTS/finish_on_device$SUFFIX.json" || { echo "finish_on_device.py failed"; status=1; }
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp -f "$RESULTS"/gpu_throughput$SUFFIX.json "$RESULTS"/gpu_e2e$SUFFIX.json "$RESULTS"/finish_on_device$SUFFIX.json \
      "$OUT"/ 2>/dev/null
  cp -f "$WORK"/gpu_throughput.log "$OUT"/ 2>/dev/null
  true
fi
echo "== done (status $status)"
exit $status

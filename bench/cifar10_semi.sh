#!/usr/bin/env bash
# The semi-supervised CIFAR-10 comparison of docs/results.md: three students on the same 620 optimizer
# steps (10 epochs of the 4,000 labeled images, batch 64), evaluated on the 10,000 test images.
#   A: labeled part only, no distillation        (kdkit train)
#   B: distillation on the labeled part only     (fixed cache of the 4,000 labeled images)
#   C: distillation on labeled + unlabeled       (fixed cache of all 50,000; 64 + 64 images per step)
# Usage (repository root, venv active): nice bash bench/cifar10_semi.sh [extra kdkit flags, e.g. --no-progress]
set -euo pipefail
R=recipes/cifar10_semi.toml
NOUNL=(--set 'data.unlabeled=""')
t() { local s=$SECONDS; "$@"; echo "TIME $((SECONDS - s)) s: $*"; }
[ -d /tmp/data/cifar10/train ] || { mkdir -p /tmp/data && tar -xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/data; }
t python bench/cifar10_semi_data.py
t kdkit cache --recipe $R "${NOUNL[@]}" --mode fixed --out /tmp/semi-cache/l --overwrite "$@"
t kdkit cache --recipe $R --mode fixed --out /tmp/semi-cache/lu --overwrite "$@"
t kdkit train --recipe $R "${NOUNL[@]}" --name A-no-kd "$@"
t kdkit distill --recipe $R "${NOUNL[@]}" --logit-cache /tmp/semi-cache/l --name B-kd-labeled "$@"
t kdkit distill --recipe $R --logit-cache /tmp/semi-cache/lu --name C-kd-labeled-unlabeled "$@"
t kdkit eval --weights kdkit/assets/teachers/resnet9_cifar_s --data /tmp/data/cifar10-semi
python - <<'PY'
import json
for name in ("A-no-kd", "B-kd-labeled", "C-kd-labeled-unlabeled"):
    s = json.load(open(f"/tmp/semi-runs/{name}/summary.json"))
    e = s["eval"]
    print(name, {k: round(e[k], 2) for k in ("class_top1", "dist_top1", "fused_top1")}, "updates", s["updates"],
          "train_s", round(s["train_seconds"]), "unlabeled", s.get("unlabeled", {}).get("images"))
PY

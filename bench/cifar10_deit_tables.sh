#!/usr/bin/env bash
# DeiT's distillation tables at CIFAR scale on 2 CPU cores (docs/results.md, "DeiT's distillation tables").
#
#   bash bench/cifar10_deit_tables.sh methods 0 1          # table 5 rows for seeds 0 and 1
#   bash bench/cifar10_deit_tables.sh vit-teacher          # the transformer teacher (recipes/cifar10_vit_teacher.toml)
#   bash bench/cifar10_deit_tables.sh convnet-teacher N    # a ResNet-9 teacher trained N epochs (accuracy matched to the ViT)
#   bash bench/cifar10_deit_tables.sh teachers N 0 1       # the token row distilled from the ViT and from that ResNet-9
#   bash bench/cifar10_deit_tables.sh compare 0            # disagreement matrix of seed 0's students and teacher
#   python bench/deit_tables_report.py                     # table + JSON (bench/results/cifar10_deit_tables.json)
#
# Every run of one seed shares data, augmentation, schedule and seed (recipes/cifar10_distillation_methods.toml);
# the rows differ only in the loss and in whether the student has a distillation token.
# Runs go to /tmp/deit-tables (OUT=... to change). Run from the repository root with the venv active.
set -euo pipefail
R=recipes/cifar10_distillation_methods.toml
OUT=${OUT:-/tmp/deit-tables}
FLAGS=(--output "$OUT" --no-progress)
PLAIN=(--set model.student=deit_tiny_patch16_224 --head shared)  # the same DeiT without the distillation token
t() { local s=$SECONDS; "$@"; echo "TIME $((SECONDS - s)) s: $*"; }
[ -d /tmp/data/cifar10/train ] || { mkdir -p /tmp/data && tar -xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/data; }
[ -d /tmp/data/cifar10-semi/train ] || python bench/cifar10_semi_data.py

cmd=$1; shift
case $cmd in
  methods)
    for s in "$@"; do
      t kdkit train --recipe $R --model deit_tiny_patch16_224 --head shared --seed "$s" --name "s$s-none" "${FLAGS[@]}"
      t kdkit distill --recipe $R "${PLAIN[@]}" --loss soft --task-weight 0 --kd-weight 1 --tau 3 --seed "$s" \
          --name "s$s-soft" "${FLAGS[@]}"
      t kdkit distill --recipe $R "${PLAIN[@]}" --loss hard --task-weight 0 --kd-weight 1 --seed "$s" \
          --name "s$s-hard" "${FLAGS[@]}"
      t kdkit distill --recipe $R --seed "$s" --name "s$s-token" "${FLAGS[@]}"
    done ;;
  vit-teacher)
    t kdkit train --recipe recipes/cifar10_vit_teacher.toml --data /tmp/data/cifar10 --name vit-teacher "${FLAGS[@]}" ;;
  convnet-teacher)
    t kdkit train --recipe recipes/cifar10_teacher.toml --data /tmp/data/cifar10 --epochs "$1" \
        --name "resnet9-e$1-teacher" "${FLAGS[@]}" ;;
  teachers)
    e=$1; shift
    for s in "$@"; do
      t kdkit distill --recipe $R --teacher deit_tiny_patch16_224 --teacher-weights "$OUT/vit-teacher/student" \
          --seed "$s" --name "s$s-token-vit" "${FLAGS[@]}"
      t kdkit distill --recipe $R --teacher-weights "$OUT/resnet9-e$e-teacher/student" \
          --seed "$s" --name "s$s-token-resnet9-e$e" "${FLAGS[@]}"
    done ;;
  compare)
    s=$1
    t kdkit compare --models "$OUT/s$s-none/student" "$OUT/s$s-token/student" \
        resnet9_cifar_s=kdkit/assets/teachers/resnet9_cifar_s --data /tmp/data/cifar10-semi \
        --out "$OUT/compare-s$s" --no-progress ;;
  *) echo "unknown step $cmd (methods | vit-teacher | convnet-teacher | teachers | compare)" >&2; exit 2 ;;
esac

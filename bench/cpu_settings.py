"""The CPU defaults of the speed switches, measured: optimizer kernel (foreach / for-loop / fused),
torch.compile of the student, the teacher's memory format (channels_last), bf16 autocast.

    python bench/cpu_settings.py [--rounds 3] [--json-out bench/results/cpu_settings.json]

One process, the quickstart's student (DeiT 4 x 128, patch 8 and patch 4 at 32x32, distillation
token, soft loss) and its teacher (the bundled ResNet-9), batch 64 of random images. Each variant
is timed over `--steps` steps after a warm-up, alternating variants round by round; the table
gives the median ms per step (student: forward, backward, AdamW step; teacher: forward only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402
from timm.optim import create_optimizer_v2

from kdkit.losses import create_loss
from kdkit.models import create_student, create_teacher

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "kdkit" / "assets" / "teachers" / "resnet9_cifar_s"


def student_step(patch: int, kernel: dict, compile_: bool = False, bf16: bool = False):
    torch.manual_seed(0)
    s = create_student("deit_tiny", 10, "token", img_size=32, patch_size=patch,
                       model_kwargs={"depth": 4, "embed_dim": 128, "num_heads": 4})
    opt = create_optimizer_v2(s, "adamw", lr=1e-3, weight_decay=0.05, **kernel)
    if compile_:
        s.compile()
    loss = create_loss("soft", task_weight=0.1, kd_weight=0.9, tau=4.0)
    x, y, t = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), torch.randn(64, 10)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = loss(s(x), t, y)["loss"]
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def teacher_forward(channels_last: bool, bf16: bool = False):
    t = create_teacher("resnet9_cifar_s", 10, weights=TEACHER, amp_dtype=torch.bfloat16 if bf16 else None)
    if channels_last:
        t.use_channels_last()
    x = torch.randn(64, 3, 32, 32)
    return lambda: t(x)


def variants() -> dict:
    return {
        "student p8, AdamW foreach (default on CPU)": lambda: student_step(8, {"foreach": True}),
        "student p8, AdamW for-loop": lambda: student_step(8, {"foreach": False}),
        "student p8, AdamW fused": lambda: student_step(8, {"fused": True}),
        "student p8, torch.compile": lambda: student_step(8, {"foreach": True}, compile_=True),
        "student p8, bf16 autocast": lambda: student_step(8, {"foreach": True}, bf16=True),
        "student p4, AdamW foreach": lambda: student_step(4, {"foreach": True}),
        "student p4, torch.compile": lambda: student_step(4, {"foreach": True}, compile_=True),
        "teacher, contiguous": lambda: teacher_forward(False),
        "teacher, channels_last (default for ConvNets)": lambda: teacher_forward(True),
        "teacher, channels_last + bf16 autocast": lambda: teacher_forward(True, bf16=True),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "cpu_settings.json")
    args = p.parse_args()
    fns = {name: make() for name, make in variants().items()}
    for fn in fns.values():  # compile and first-call costs out of the timings
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start = time.perf_counter()
            for _ in range(args.steps):
                fns[name]()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    cpu = cpu_model()
    result = {"bench": "cpu_settings", "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "ms_per_step": {k: {"median": statistics.median(v), "rounds": v} for k, v in times.items()},
              "command": "python bench/cpu_settings.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                   for k, v in vars(args).items() if k != "json_out")}
    table = Table(title=f"ms per step, batch 64, {cpu}, {torch.get_num_threads()} threads")
    for col in ("variant", "median ms", "min", "max"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, v in times.items():
        table.add_row(name, f"{statistics.median(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}")
    Console().print(table)
    print(json.dumps(result))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

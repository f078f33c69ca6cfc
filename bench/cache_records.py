"""Cache format 3 records: their bytes, and what a top-K record changes in each loss.

    python bench/cache_records.py [--data cifar10-sample] [--json-out bench/results/cache_records.json]

1. Bytes: one shard of 4096 float16 records written by kdkit's store, K = 10 of 10 and of 1000
   classes; each field's bytes per record and the file's size per record (headers included).
2. Errors: teacher rows densified from top-K records (float32, so that only K matters) against the
   full rows, through each logit loss: the relative error of the loss and of its gradient with
   respect to the student's logits (||g_K - g|| / ||g||), the gradient split into the stored
   classes and the tail. Teachers: the bundled ResNet-9 on the 2,000 held-out images of the
   CIFAR-10 sample (K = 1, 3, 5 of 10; the label is the image's, placed as a run places it), and
   synthetic 1000-class logits shaped like a trained classifier's (tests/test_cache_records.py
   `teacher_like`; K = 10, 50). Student logits: the teacher's plus Gaussian noise (std 2), a
   student that roughly agrees with its teacher.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdkit.cache import FORMAT, LogitStore, decode_record, encode_record  # noqa: E402
from kdkit.cache.store import mmap_safetensors  # noqa: E402
from kdkit.config import load_recipe  # noqa: E402
from kdkit.engine.build import build_run  # noqa: E402
from kdkit.engine.step import make_batch  # noqa: E402
from kdkit.losses import dist_loss, mlkd_terms, soft_kd, z_score  # noqa: E402
from kdkit.losses.dkd import dkd  # noqa: E402
from tests.helpers import teacher_like  # noqa: E402

TEACHER = Path(__file__).resolve().parent.parent / "kdkit" / "assets" / "teachers" / "resnet9_cifar_s"

LOSSES = {  # name -> (loss(student, teacher, labels), tail fill the run would use)
    "soft tau 1": (lambda s, t, y: soft_kd(s, t, 1.0), "mass"),
    "soft tau 4": (lambda s, t, y: soft_kd(s, t, 4.0), "mass"),
    "soft + standardize tau 2": (lambda s, t, y: soft_kd(z_score(s), z_score(t), 2.0), "normal"),
    "  (same, mass fill)": (lambda s, t, y: soft_kd(z_score(s), z_score(t), 2.0), "mass"),
    "dkd tau 1": (lambda s, t, y: dkd(s, t, y, 1.0, 8.0, 1.0), "mass"),
    "dkd tau 4": (lambda s, t, y: dkd(s, t, y, 1.0, 8.0, 4.0), "mass"),
    "dist tau 1": (lambda s, t, y: dist_loss(s, t, tau=1.0), "mass"),
    "mlkd (2..6)": (lambda s, t, y: sum(mlkd_terms(s, t)), "mass"),
}


def record_sizes() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for classes in (10, 1000):
            root = Path(tmp) / str(classes)
            (root / "shards").mkdir(parents=True)
            manifest = {"format": FORMAT, "mode": "replay", "epochs": 1, "num_classes": classes, "topk": 10,
                        "dtype": "float16", "records_per_epoch": 4096, "shard_size": 4096}
            g = torch.Generator().manual_seed(0)
            rec = encode_record(teacher_like(4096, classes), 10, torch.float16, torch.randint(classes, (4096,), generator=g))
            LogitStore(root, manifest).write(0, 0, rec)
            path = root / "shards" / "e0000-s00000.safetensors"
            tensors, _ = mmap_safetensors(path)
            fields = {k: t[0].numel() * t.element_size() for k, t in sorted(tensors.items())}
            out[f"K10_of_{classes}"] = {"fields": fields, "bytes_per_record": sum(fields.values()),
                                        "file_bytes_per_record": path.stat().st_size / 4096}
    return out


def cifar_teacher(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 10) logits of the bundled teacher on the held-out images, and their labels."""
    r = load_recipe("quickstart", {"model": {"teacher_weights": str(TEACHER)},
                                   "data": {"path": data, "workers": 0}, "run": {"progress": False}})
    parts = build_run(r, "distill")
    logits, labels = [], []
    with torch.inference_mode():
        for raw in parts.eval_loader:
            batch = make_batch({**raw, "epoch": 0}, torch.device("cpu"))
            logits.append(parts.logits(batch).float())
            labels.append(batch.target)
    return torch.cat(logits), torch.cat(labels)


def errors(z: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logp = z.log_softmax(1).double()
    student = (logp + 2 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).requires_grad_()
    rec = encode_record(z, k, torch.float32, labels)
    stored = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, rec["indices"].long(), True)
    stored[torch.arange(len(labels)), labels] = True
    out = {}
    for name, (loss, tail) in LOSSES.items():
        dense = decode_record(rec, z.shape[1], labels, tail).double()
        ref, got = loss(student, logp, labels), loss(student, dense, labels)
        g_ref = torch.autograd.grad(ref, student)[0]
        g_got = torch.autograd.grad(got, student)[0]
        diff = g_got - g_ref
        out[name] = {"loss_rel": abs(got.item() - ref.item()) / abs(ref.item()),
                     "grad_rel": (diff.norm() / g_ref.norm()).item(),
                     "grad_rel_stored": (diff[stored].norm() / g_ref.norm()).item(),
                     "grad_rel_tail": (diff[~stored].norm() / g_ref.norm()).item()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="cifar10-sample")
    p.add_argument("--json-out", default="bench/results/cache_records.json")
    args = p.parse_args()
    torch.manual_seed(0)
    sizes = record_sizes()
    z, y = cifar_teacher(args.data)
    settings = {f"ResNet-9, CIFAR-10 sample, K = {k} of 10": errors(z, y, k) for k in (1, 3, 5)}
    synth = teacher_like(2000, 1000, seed=1)
    labels = torch.randint(1000, (2000,), generator=torch.Generator().manual_seed(2))
    settings.update({f"synthetic, K = {k} of 1000": errors(synth, labels, k) for k in (10, 50)})
    console = Console(width=140)
    table = Table(title="format 3 record bytes (float16, K = 10)")
    for col in ("classes", "values", "indices", "mean", "std", "label", "record", "file / record"):
        table.add_column(col, justify="right")
    for name, s in sizes.items():
        f = s["fields"]
        table.add_row(name.split("_")[-1], *(str(f.get(x, "-")) for x in ("values", "indices", "mean", "std", "label")),
                      str(s["bytes_per_record"]), f"{s['file_bytes_per_record']:.2f}")
    console.print(table)
    table = Table(title="top-K records against the full rows: relative error of the loss / of its gradient "
                        "(stored classes + tail)")
    table.add_column("loss")
    for name in settings:
        table.add_column(name, justify="right")
    for loss in LOSSES:
        cells = [f"{s[loss]['loss_rel']:.1e} / {s[loss]['grad_rel']:.1e} ({s[loss]['grad_rel_stored']:.0e} + "
                 f"{s[loss]['grad_rel_tail']:.0e})" for s in settings.values()]
        table.add_row(loss, *cells)
    console.print(table)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "command": f"python bench/cache_records.py --data {args.data}", "bytes": sizes, "errors": settings}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

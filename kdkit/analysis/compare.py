"""Disagreement analysis (DeiT, Touvron et al., 2021, Table 4): the fraction of test images on which
two classifiers' top-1 predictions differ, for every pair among the ground truth and the models.

A kdkit student folder with two heads gives three rows (its class head, its distillation head and
their late fusion); one with a shared head, or a plain timm model, gives one. Against the ground
truth a row's value is its top-1 error. Only images every model could read are counted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdkit.accelerator import create_accelerator
from kdkit.console import progress_bar
from kdkit.data import batch_images, create_loader, eval_transform, open_dataset
from kdkit.files import atomic_write, atomic_write_text
from kdkit.models import load_saved
from kdkit.registry import KdkitError
from kdkit.types import StudentOut

TRUTH = "ground truth"
HEAD_ROWS = ("class", "distillation", "fused")


def disagreement(predictions: dict[str, Tensor]) -> Tensor:
    """(R, R) fraction of samples on which each pair of rows differ, in the order of `predictions`.

    predictions: row name -> (N,) class indices, all over the same N samples. Symmetric, zero diagonal.
    """
    preds = torch.stack([p.long() for p in predictions.values()])  # (R, N)
    if preds.shape[1] == 0:
        raise KdkitError("no images to compare")
    return (preds[:, None, :] != preds[None, :, :]).double().mean(dim=2)


def parse_model(spec: str) -> tuple[str, str | None, Path]:
    """`FOLDER`, `FILE` beside a config.json, or `NAME=PATH` (timm name + weights file or folder).
    Returns (label, timm name or None, path)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = None, spec
    p = Path(path)
    if not p.exists():
        raise KdkitError(f"model {spec!r}: {p} not found (give a kdkit student folder or NAME=WEIGHTS)")
    if name is None and not (p if p.is_dir() else p.parent).joinpath("config.json").is_file():
        raise KdkitError(f"model {spec!r}: no config.json in {p if p.is_dir() else p.parent}: give NAME={path}")
    folder = p if p.is_dir() else p.parent
    # runs/NAME/student -> NAME: the run's name says more than "student"
    label = name or (folder.parent.name if folder.name in ("student", "student_ema") else folder.name)
    return label, name, p


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


@torch.no_grad()
def predict(module: torch.nn.Module, loader, device: torch.device, n: int,
            to_data: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Top-1 of every head over the loader, by dataset index (-1 where unreadable).

    to_data: (K,) the data's class index for each of the model's classes. Returns
    ({"class"|"distillation"|"fused" or "": (n,) predictions}, (n,) targets)."""
    module.eval().to(device)
    preds: dict[str, Tensor] = {}
    target = torch.full((n,), -1, dtype=torch.long)
    for raw in loader:
        if raw["images"] is None:
            continue
        out = module(batch_images(raw, device))
        heads = ({"": out} if not isinstance(out, StudentOut) else {"": out.logits} if out.logits is out.dist_logits
                 else dict(zip(HEAD_ROWS, (out.logits, out.dist_logits, out.fused), strict=True)))
        for head, logits in heads.items():
            preds.setdefault(head, torch.full((n,), -1, dtype=torch.long))[raw["index"]] = \
                to_data[logits.float().argmax(1).cpu()]
        target[raw["index"]] = raw["target"]
    return preds, target


def compare(models: list[str], data: str, split: str = "auto-eval", batch_size: int = 256,
            workers: int = 2, progress: bool = True) -> tuple[list[str], Tensor, int]:
    """Predict with every model on one split and return (row labels, (R, R) matrix, images counted).

    Each model sees the data through its own evaluation transform (size, normalisation), and its
    classes are matched to the data's by name when it saved label_names (else taken in the data's
    order). The ground truth is the first row.
    """

    if not models:
        raise KdkitError("give at least one model")
    specs = [parse_model(m) for m in models]
    acc = create_accelerator()
    ds = open_dataset(data, split)
    classes = list(ds.classes)
    rows: dict[str, Tensor] = {}
    truth = None
    for label, (_, name, path) in zip(_unique([s[0] for s in specs]), specs, strict=True):
        module, model_classes, dcfg = load_saved(path, name, num_classes=len(classes))
        to_data = _class_map(label, model_classes, classes, _num_outputs(module))
        ds.transform = eval_transform(dcfg)
        loader = create_loader(ds, batch_size, training=False, workers=workers)
        with progress_bar(acc, label, total=len(loader), enabled=progress) as bar:
            preds, target = predict(module, _ticking(loader, bar), acc.device, len(ds), to_data)
        truth = target if truth is None else truth
        for head, p in preds.items():
            rows[f"{label} ({head})" if head else label] = p
        del module
    seen = (truth >= 0) & torch.stack([p >= 0 for p in rows.values()]).all(dim=0)
    if not seen.any():
        raise KdkitError(f"no readable, labelled image in {data} ({split})")
    table = {TRUTH: truth[seen], **{k: v[seen] for k, v in rows.items()}}
    return list(table), disagreement(table), int(seen.sum())


def _ticking(loader, bar):
    for batch in loader:
        yield batch
        bar()


def _num_outputs(module: torch.nn.Module) -> int:
    inner = getattr(module, "model", module)
    return int(getattr(inner, "num_classes", 0))


def _class_map(label: str, model_classes: list[str] | None, classes: list[str], k: int) -> Tensor:
    """(K,) data index of each of the model's classes."""
    if model_classes is None:
        if k and k != len(classes):
            raise KdkitError(f"{label} predicts {k} classes but the data has {len(classes)}")
        return torch.arange(len(classes))
    missing = sorted(set(model_classes) ^ set(classes))
    if missing:
        raise KdkitError(f"{label}'s classes differ from the data's: {missing[:5]}")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in model_classes])


def write_csv(path: str | Path, labels: list[str], matrix: Tensor) -> Path:
    """The matrix as CSV: a header of labels, then one row per label (fractions, 6 decimals)."""
    import csv
    import io


    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["", *labels])
    for label, row in zip(labels, matrix.tolist(), strict=True):
        w.writerow([label, *(f"{v:.6f}" for v in row)])
    return atomic_write_text(path, buf.getvalue())


def draw_heatmap(path: str | Path, labels: list[str], matrix: Tensor, title: str = "disagreement") -> Path:
    """A PNG heat-map (white = always agree, dark red = the largest disagreement), values in the cells.

    Drawn with PIL, so it needs no plotting library."""
    from PIL import Image, ImageDraw, ImageFont


    font = ImageFont.load_default()
    cell, pad = 56, 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(measure.textlength(s, font=font)) for s in labels) + pad
    r = len(labels)
    left, top = text_w + pad, text_w + 2 * pad + 16
    img = Image.new("RGB", (left + r * cell + pad, top + r * cell + pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=font)
    vmax = float(matrix.max()) or 1.0
    for i in range(r):
        draw.text((pad, top + i * cell + cell // 2 - 6), labels[i], fill="black", font=font)
        # column labels, written sideways into a strip and rotated upright
        strip = Image.new("RGB", (text_w, 14), "white")
        ImageDraw.Draw(strip).text((0, 0), labels[i], fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (left + i * cell + cell // 2 - 7, top - text_w - pad // 2))
        for j in range(r):
            v = float(matrix[i, j])
            s = v / vmax
            color = (255 - int(75 * s), int(255 * (1 - s)), int(255 * (1 - s)))  # white -> dark red
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=color, outline=(200, 200, 200))
            text = f"{v:.3f}"
            tw = measure.textlength(text, font=font)
            draw.text((box[0] + (cell - tw) / 2, box[1] + cell // 2 - 6), text,
                      fill="white" if s > 0.6 else "black", font=font)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))

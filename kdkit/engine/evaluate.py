"""Evaluation: top-1/top-5 of the class head, the distillation head and their late fusion."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdkit.accelerator import create_accelerator
from kdkit.console import progress_bar
from kdkit.types import StudentOut


def _correct(logits: Tensor, target: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None,
             description: str = "eval", progress: bool = True) -> dict[str, float]:
    """Accuracy (in %) over the whole loader, gathered over processes without double counting.

    model: returns StudentOut, or plain (B, K) logits (a teacher or any classifier; its "dist" and
    "fused" rows then equal its class row). Returns class_top1/top5, dist_top1/top5, fused_top1/top5,
    n (images counted), skipped (unreadable images) and images_per_s.
    """
    acc = accelerator or create_accelerator()
    was_training = model.training
    model.eval()
    sums = {f"{h}_top{k}": 0.0 for h in ("class", "dist", "fused") for k in (1, 5)}
    n, skipped, seconds = 0, 0, 0.0
    with progress_bar(acc, description, total=len(loader), enabled=progress) as bar:
        for raw in loader:
            skipped += raw["skipped"]
            if raw["images"] is not None:
                images, target = raw["images"].to(acc.device), raw["target"].to(acc.device)
                start = time.perf_counter()
                out = model(images)
                out = out if isinstance(out, StudentOut) else StudentOut(out, out)
                seconds += time.perf_counter() - start
                heads = {"class": out.logits, "dist": out.dist_logits, "fused": out.fused}
                gathered = acc.gather_for_metrics((target, *heads.values()))
                target, logits = gathered[0], dict(zip(heads, gathered[1:], strict=True))
                n += target.shape[0]
                for h, lg in logits.items():
                    for k in (1, 5):
                        sums[f"{h}_top{k}"] += _correct(lg.float(), target, k).item()
            bar()
    model.train(was_training)
    result = {k: 100.0 * v / max(n, 1) for k, v in sums.items()}
    result.update(n=n, skipped=int(skipped), images_per_s=n / seconds if seconds else 0.0)
    return result

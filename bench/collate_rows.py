"""What a 224 px batch costs to assemble on one core: views converted one by one and stacked (what
kdkit's loader does today: ToNormalizedTensor into a fresh tensor per view, then the collate's
torch.stack into a fresh batch) against views converted straight into the rows of one batch tensor.
The pixels are the same to the bit (checked); the difference is allocation (page faults) and a copy.

    python bench/collate_rows.py [--batch 64] [--size 224] [--repeats 10] [--json bench/results/collate_rows.json]

Prints a table and JSON (stdout); writes --json. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

from kdkit.data.transforms import ToNormalizedTensor  # noqa: E402


def stacked(convert: ToNormalizedTensor, images: list[Image.Image]) -> torch.Tensor:
    """Today's path: one fresh float tensor per view, then one fresh batch by torch.stack."""
    return torch.stack([convert(img) for img in images])


def into_rows(convert: ToNormalizedTensor, images: list[Image.Image]) -> torch.Tensor:
    """The same arithmetic written into the rows of one batch tensor."""
    w, h = images[0].size
    out = torch.empty(len(images), 3, h, w)
    for row, img in zip(out, images, strict=True):
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        torch.addcmul(convert.shift, x, convert.scale, out=row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10, help="timed batches per round (3 rounds, alternating)")
    p.add_argument("--json", default="bench/results/collate_rows.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    convert = ToNormalizedTensor((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if not torch.equal(stacked(convert, images), into_rows(convert, images)):
        sys.exit("error: the two paths give different pixels")
    ways = {"stacked (today)": stacked, "into rows": into_rows}
    ms: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(3):
        for name, fn in (ways.items() if r % 2 == 0 else reversed(ways.items())):
            for _ in range(2):
                fn(convert, images)
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn(convert, images)
            ms[name].append((time.perf_counter() - start) / args.repeats * 1000)
    medians = {k: statistics.median(v) for k, v in ms.items()}
    out = {"bench": "collate_rows", "batch": args.batch, "size": args.size, "ms_per_batch": ms,
           "median_ms_per_batch": medians,
           "us_per_sample": {k: v * 1000 / args.batch for k, v in medians.items()},
           "speedup": medians["stacked (today)"] / medians["into rows"], "bit_identical": True,
           "machine": {"cpu_model": cpu_model(), "torch": torch.__version__}, "kdkit": kdkit_source(),
           "command": "python bench/collate_rows.py " + " ".join(sys.argv[1:])}
    t = Table(title=f"{args.batch} views of {args.size} px to one float batch, one core")
    for col in ("path", "ms a batch (median of 3)", "µs a sample"):
        t.add_column(col)
    for k, v in medians.items():
        t.add_row(k, f"{v:.1f}", f"{v * 1000 / args.batch:.0f}")
    Console().print(t)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

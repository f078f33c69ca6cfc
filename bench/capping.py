"""What capping the stored image size costs: decode time and accuracy at the quickstart's scale.

    python bench/capping.py [--caps 0 64 32] [--seeds 0] [--size 256] [--json PATH]

The quickstart's data (the bundled 3,000 training and 2,000 test CIFAR-10 images) is upscaled
(bicubic) to --size px squares and stored as JPEG quality 90, standing in for photos larger than
the training resolution. Each cap is then written as tar shards by `kdkit shards --max-size CAP`
(0: stored as they are), and for each:
  decode: the mean time to decode one stored image (PIL, one thread, every image, best of 3 passes)
          and the mean stored size;
  accuracy: the quickstart's distillation (`kdkit distill --recipe quickstart`, the bundled
          ResNet-9 teacher, 32 px student) trained on those shards, for each --seeds; fused top-1
          on the test split stored the same way.
Prints a table and JSON; writes --json (default bench/results/capping.json). Data is prepared once
under --cache-dir (default $KDKIT_BENCH_CACHE or ~/.cache/kdkit-bench).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402


def upscaled(cache: Path, size: int) -> Path:
    """The bundled sample upscaled to size x size JPEGs (train/ and test/), built once."""
    from kdkit.data import sample_path

    root = cache / f"quickstart-sample-{size}px-q90"
    if (root / "test").is_dir():
        return root
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for src in sorted(sample_path().rglob("*.jpg")):
            dst = Path(tmp) / src.relative_to(sample_path())
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, "JPEG", quality=90)
        os.replace(tmp, root)
        Path(tmp).mkdir()
    return root


def shards(cache: Path, source: Path, cap: int) -> Path:
    out = cache / f"{source.name}-wds-cap{cap}"
    if not (out / "_info.json").is_file():
        cmd = [sys.executable, "-m", "kdkit", "shards", str(source), "--out", str(out), "--shard-size", "1000",
               "--max-size", str(cap), "--json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def decode_cost(root: Path) -> dict:
    from kdkit.data import open_dataset

    ds = open_dataset(root, "train")
    blobs = [ds.read_bytes(i) for i in range(len(ds))]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for b in blobs:
            Image.open(io.BytesIO(b)).load()
        best = min(best, time.perf_counter() - start)
    side = Image.open(io.BytesIO(blobs[0])).size
    return {"us_per_image": best / len(blobs) * 1e6, "mean_kb": sum(map(len, blobs)) / len(blobs) / 1024,
            "stored_size": list(side)}


def distil(root: Path, seed: int, out: Path, name: str) -> dict:
    from kdkit.cli.quickstart import teacher_path

    cmd = [sys.executable, "-m", "kdkit", "distill", "--recipe", "quickstart", "--teacher-weights", str(teacher_path()),
           "--data", str(root), "--seed", str(seed), "--output", str(out), "--name", name, "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / name / "summary.json").read_text())
    return {"fused_top1": summary["eval"]["fused_top1"], "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps", nargs="+", type=int, default=[0, 64, 32])
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="quickstart seeds per cap (none: decode only)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cache-dir", default=os.environ.get("KDKIT_BENCH_CACHE", "~/.cache/kdkit-bench"))
    p.add_argument("--json", default="bench/results/capping.json")
    args = p.parse_args()
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    source = upscaled(cache, args.size)
    load = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as runs:
        for cap in args.caps:
            root = shards(cache, source, cap)
            res = {"decode": decode_cost(root), "runs": {}}
            for seed in args.seeds:
                res["runs"][seed] = distil(root, seed, Path(runs), f"cap{cap}-seed{seed}")
                Console(stderr=True).print(f"cap {cap}, seed {seed}: {res['runs'][seed]}")
            tops = [r["fused_top1"] for r in res["runs"].values()]
            res["fused_top1_mean"] = statistics.mean(tops) if tops else None
            results[cap] = res
    t = Table(title=f"capping the stored size: quickstart data upscaled to {args.size} px ({cpu_model()})")
    for col in ("cap (long side)", "stored px", "mean KB", "decode us/image", "decode vs uncapped",
                "fused top-1 (mean of seeds)", "seeds"):
        t.add_column(col, justify="right")
    base = results[args.caps[0]]["decode"]["us_per_image"]
    for cap, res in results.items():
        d = res["decode"]
        t.add_row(str(cap or "none"), "x".join(map(str, d["stored_size"])), f"{d['mean_kb']:.1f}",
                  f"{d['us_per_image']:.0f}", f"{base / d['us_per_image']:.2f}x",
                  "-" if res["fused_top1_mean"] is None else f"{res['fused_top1_mean']:.2f}",
                  " ".join(f"{r['fused_top1']:.2f}" for r in res["runs"].values()))
    out = {"bench": "capping", "kdkit": kdkit_source(), "cpu": cpu_model(), "cores": os.cpu_count(),
           "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
           "command": "python bench/capping.py " + " ".join(sys.argv[1:]), "size": args.size, "results": results}
    Console(width=140).print(t)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""kdkit shards: write a data source as webdataset tar shards (timm's and the Hub's -wds layout), or
index existing shards so that kdkit opens them without scanning."""

from __future__ import annotations

import argparse
import json

EPILOG = """examples:
  kdkit shards /data/imagenet --out /data/imagenet-wds                   # train/ and val/ -> train-*.tar, val-*.tar
  kdkit shards /data/imagenet --out /data/imagenet-wds-512 --max-size 512 # long side capped at 512 px (FFCV-style)
  kdkit shards hf:timm/mini-imagenet --splits train validation --out DIR  # a datasets dataset
  kdkit shards hf:timm/imagenet-1k --streaming --out DIR                  # streamed: no download ahead
  kdkit shards 'https://host/wds/train-{000000..000146}.tar' --out DIR    # remote shards copied + indexed
  kdkit shards --index /data/imagenet-1k-wds                              # index shards written by others
  kdkit distill --data /data/imagenet-wds --train-split 'train-{000000..000128}.tar' --val-split val ...
The shards hold KEY.jpg (the original bytes, unless --max-size re-encodes a larger image) and
KEY.cls (the class index), an _info.json with timm's split info and the class names, and an index
per shard (NAME.tar.idx.npz). A run from the shards equals the run from the source, bit for bit.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write data as webdataset tar shards (or index shards)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("data", nargs="?", metavar="DATA", help="a data source, as --data takes it")
    p.add_argument("--out", metavar="DIR", help="the new folder to write (refused if it exists)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT",
                   help="splits to write (default: train and the evaluation split, auto-eval, when present)")
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="samples per shard (default: 10000)")
    p.add_argument("--max-size", type=int, default=0, metavar="PX",
                   help="cap each image's long side at PX, re-encoding larger ones as JPEG (default: 0, keep)")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of re-encoded images (default: 90)")
    p.add_argument("--streaming", action="store_true",
                   help="hf:NAME: stream the dataset (datasets' streaming=True) straight into shards")
    p.add_argument("--index", metavar="DIR", help="instead: write the index of every .tar under DIR beside it")
    p.add_argument("--input-key", metavar="KEY", help="image member of a sample, as timm's (default: jpg, png, ...)")
    p.add_argument("--target-key", metavar="KEY", help="label member of a sample (default: cls) or label column")
    p.add_argument("--class-map", metavar="FILE", help="class names, one a line, fixing the label space")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdkit.registry import KdkitError

    keys = {"input_key": args.input_key, "target_key": args.target_key}
    if args.index:
        from kdkit.data.shard_writer import index_shards

        if args.data or args.out:
            raise KdkitError("--index DIR writes indexes beside DIR's shards: give no DATA or --out with it")
        shards = sorted(Path(args.index).rglob("*.tar"))
        if not shards:
            raise KdkitError(f"no .tar shards under {args.index}")
        written = index_shards(shards, **keys)
        result = {"indexed": len(written), "folder": args.index}
    else:
        if not args.data or not args.out:
            raise KdkitError("give DATA and --out DIR (or --index DIR)")
        result = write(args, keys)
    print(json.dumps(result) if args.json else ", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def write(args: argparse.Namespace, keys: dict) -> dict:
    import time

    from rich.progress import Progress

    from kdkit.console import console
    from kdkit.data import open_dataset, read_class_map
    from kdkit.data.shard_writer import copy_shards, hf_stream_rows, write_shards
    from kdkit.data.shards import expand_pattern, is_url
    from kdkit.registry import KdkitError

    start = time.perf_counter()
    if is_url(args.data):  # remote shards: copied as they are, and indexed
        urls = expand_pattern(args.data)
        with Progress(console=console, transient=True, disable=args.json) as bar:
            task = bar.add_task("shards", total=len(urls))
            out = copy_shards(urls, args.out, progress=lambda n: bar.advance(task, n))
        return {"out": str(out), "shards": len(urls), "seconds": round(time.perf_counter() - start, 2)}
    if args.streaming:
        if not args.data.startswith("hf:"):
            raise KdkitError("--streaming streams a Hub dataset: give DATA as hf:NAME")
        classes = read_class_map(args.class_map) if args.class_map else None
        streams = {}
        for split in args.splits or ["train"]:
            classes, streams[split] = hf_stream_rows(args.data[3:], split, classes=classes, **keys)
        with Progress(console=console, transient=True, disable=args.json) as bar:
            task = bar.add_task("shards", total=None)
            out = write_shards(streams, args.out, args.shard_size, args.max_size, args.quality,
                               progress=lambda n: bar.advance(task, n), classes=classes)
        return {"out": str(out), "seconds": round(time.perf_counter() - start, 2)}
    train = open_dataset(args.data, (args.splits or ["train"])[0], class_map=args.class_map, **keys)
    splits = {(args.splits or ["train"])[0]: train}
    names = args.splits[1:] if args.splits else ["auto-eval"]
    for name in names:
        try:
            ds = open_dataset(args.data, name, classes=train.classes, **keys)
        except KdkitError:
            if args.splits:
                raise
            continue  # no evaluation split: train only
        splits["val" if name == "auto-eval" else name] = ds
    total = sum(len(d) for d in splits.values())
    with Progress(console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task("shards", total=total)
        out = write_shards(splits, args.out, args.shard_size, args.max_size, args.quality,
                           progress=lambda n: bar.advance(task, n))
    return {"out": str(out), "samples": {k: len(v) for k, v in splits.items()},
            "seconds": round(time.perf_counter() - start, 2)}

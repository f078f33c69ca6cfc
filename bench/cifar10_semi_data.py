"""Build the semi-supervised CIFAR-10 split of docs/results.md from the unpacked CIFAR-10 JPEGs.

    python bench/cifar10_semi_data.py [--src /tmp/data/cifar10] [--out /tmp/data/cifar10-semi] [--per-class 400]

Writes (hard links, or copies across file systems; reruns replace the folder):
    OUT/train/<class>/<name>.jpg   the labeled part: the first --per-class files of every class, in name order
    OUT/test -> SRC/test           the full test split (a symbolic link)
    OUT/unlabeled/u00000.jpg ...   every other training image, flat, labels dropped: the names are
                                   positions in a seeded shuffle, so neither name nor order tells the class
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path


def link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="/tmp/data/cifar10", help="unpacked cifar10-jpg.tar.gz (train/, test/)")
    p.add_argument("--out", default="/tmp/data/cifar10-semi")
    p.add_argument("--per-class", type=int, default=400, help="labeled images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the unlabeled file names")
    args = p.parse_args()
    src, out = Path(args.src), Path(args.out)
    if not (src / "train").is_dir():
        raise SystemExit(f"{src}/train not found: mkdir -p /tmp/data && tar -xzf ../shared/data/cifar10-jpg.tar.gz "
                         f"-C /tmp/data")
    shutil.rmtree(out, ignore_errors=True)
    (out / "unlabeled").mkdir(parents=True)
    (out / "test").symlink_to((src / "test").resolve(), target_is_directory=True)
    rest = []
    for cls in sorted(d.name for d in (src / "train").iterdir() if d.is_dir()):
        files = sorted((src / "train" / cls).iterdir())
        (out / "train" / cls).mkdir(parents=True)
        for f in files[: args.per_class]:
            link(f, out / "train" / cls / f.name)
        rest += files[args.per_class :]
    random.Random(args.seed).shuffle(rest)
    for i, f in enumerate(rest):
        link(f, out / "unlabeled" / f"u{i:05d}{f.suffix}")
    counts = {"labeled": sum(1 for _ in (out / "train").glob("*/*")), "unlabeled": len(rest),
              "test": sum(1 for _ in (out / "test").glob("*/*"))}
    print(json.dumps({"out": str(out), **counts}))


if __name__ == "__main__":
    main()

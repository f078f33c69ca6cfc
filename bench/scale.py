"""ImageNet-scale data without a GPU: kdkit's folder and tar-shard sources against timm's loaders on a
synthetic ImageNet-1k-sized set (issue 20, item 5).

    python bench/scale.py [--stages generate open first-step memory cache] [--samples 1281167]
                          [--fraction 1.0] [--cache-dir DIR] [--json bench/results/scale.json]

Stages (each can be rerun alone; results are merged into --json, so a rerun replaces one part):
  generate    A set of --samples training images in --classes classes (default 1,281,167 in 1,000:
              ImageNet-1k's size) plus a --val-samples validation split, as an ImageFolder
              (ROOT/train/<class>/<file>.jpg) of hard links to the 50,000 CIFAR-10 training JPEGs
              of /work/shared/data/cifar10-jpg.tar.gz, assigned round-robin (sample i: class
              i % classes, file i % 50,000); then the same set as tar shards of 10,000 samples
              (`kdkit shards ROOT --out SHARDS --shard-size 10000`, timed). Built in a temporary
              folder, renamed when complete, reused when present (under --cache-dir, default
              $KDKIT_BENCH_CACHE or ~/.cache/kdkit-bench).
  open        Time and main-process memory to open the training split, each in a fresh process:
              kdkit.data.open_dataset(ROOT, "train") against timm.data.create_dataset("", root=ROOT,
              split="train") (timm's ImageFolder reader); for shards kdkit with the .idx.npz indexes,
              kdkit without them (scanning the tar headers; on --scan-shards shards hard-linked into
              another folder, extrapolated) and timm.data.create_dataset("wds/...", root=SHARDS).
              Also kdkit's fingerprint (kdkit.cache.manifest.data_identity) and a logit-cache
              manifest built from it (build_manifest): time and JSON size.
  first-step  Seconds from the command to the first training step: `kdkit train` (folder, shards)
              in a subprocess, polled until its metrics.jsonl has a line with "step"; for timm,
              from process start to its loader's first batch (create_dataset + create_loader with
              8 workers + next(iter(loader))), timm's train.py not being installed.
  memory      RSS, PSS and private memory (USS = Private_Clean + Private_Dirty) of the main
              process and of each of 8 loader workers (its children), sampled every second from
              /proc/PID/smaps_rollup, over a pass of --fraction of the 1.28M training samples
              (eval transform at 32 px, batch 256, no training), in a shuffled order as training
              draws it (a random order touches every page of a list of samples; an in-order pass
              touches 1/8 per worker): kdkit's create_loader(training=True, workers=8) with
              kdkit's eval transform (folder, shards) and timm's ImageDataset + create_transform
              (eval) in a shuffled DataLoader(num_workers=8) (folder).
  cache       A 1.28M-record logit cache (kdkit's LogitStore: top-10 of 1,000 classes, float16,
              shards of 4096 records) of random logits: its size, and reading every record in the
              epoch's order (EpochSampler's) in batches of 256 through LogitCache.lookup.

Every figure is also given per million samples and extrapolated to 14M (ImageNet-21k) in the table.
Timings are taken on whatever machine runs this; the JSON records os.getloadavg() at the start and
the end of each stage, since a shared machine's load changes them. Prints a table and JSON (stdout);
writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

TARBALL = Path("/work/shared/data/cifar10-jpg.tar.gz")
IMAGENET_1K = 1_281_167
IMAGENET_21K = 14_197_122  # the full ImageNet-21k (fall11) image count
MILLION = 1_000_000
BATCH = 256
WORKERS = 8
WARM = 40  # batches before a pass's memory "start" (5 per worker)
STAGES = ("generate", "open", "first-step", "memory", "cache")
HERE = Path(__file__).resolve().parent


# --- data -------------------------------------------------------------------------------------------

def cifar_sources(cache: Path, tarball: Path) -> list[Path]:
    """The 50,000 CIFAR-10 training JPEGs (unpacked once, bench/data_pipeline.py), class then name order."""
    from data_pipeline import unpacked_cifar

    train = unpacked_cifar(cache, tarball) / "train"
    return sorted(p for c in sorted(train.iterdir()) if c.is_dir() for p in sorted(c.iterdir()))


def linked_split(folder: Path, n: int, classes: int, sources: list[Path]) -> None:
    """folder/<class>/<i>.jpg for i < n: sample i in class i % classes, a hard link to sources[i % len]."""
    names = [f"n{c:08d}" for c in range(classes)]  # ImageNet's wnid shape
    for name in names:
        (folder / name).mkdir(parents=True)
    for i in range(n):
        os.link(sources[i % len(sources)], folder / names[i % classes] / f"{i:08d}.jpg")


def check_disk(cache: Path, need: int) -> dict:
    free = shutil.disk_usage(cache).free
    if free < need:
        sys.exit(f"error: {cache} has {free / 2**30:.1f} GiB free; the shards need about {need / 2**30:.1f} GiB")
    return {"free_bytes": free, "needed_bytes": need}


def generate(args, cache: Path, log) -> dict:
    """The folder and shard versions of the synthetic set (built once, reused); timings when built."""
    out: dict = {}
    root, shards = data_paths(args, cache)
    sources = cifar_sources(cache, Path(args.tarball))
    mean_jpg = sum(p.stat().st_size for p in sources[::50]) / len(sources[::50])
    # a shard sample: a 512-byte header + the JPEG rounded up to 512, a header + a 512-byte block for .cls
    per_sample = 512 + -(-int(mean_jpg) // 512) * 512 + 1024
    out["disk"] = check_disk(cache, int(1.2 * per_sample * (args.samples + args.val_samples)))
    out["source_jpeg_mean_bytes"] = mean_jpg
    if not (root / "train").is_dir():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{root.name}-") as tmp:
            linked_split(Path(tmp) / "train", args.samples, args.classes, sources)
            linked_split(Path(tmp) / "val", args.val_samples, args.classes, sources)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
            os.chmod(root, 0o755)  # mkdtemp made it private
            Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
        out["folder_build_seconds"] = time.perf_counter() - start
        log(f"linked {args.samples} + {args.val_samples} files into {root} in {out['folder_build_seconds']:.1f} s")
    if not (shards / "_info.json").is_file():
        # kdkit shards writes a new folder atomically (refusing an existing one)
        cmd = [sys.executable, "-m", "kdkit", "shards", str(root), "--out", str(shards), "--shard-size",
               str(args.shard_size), "--json"]
        start = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        out["shards_command"] = "kdkit " + " ".join(cmd[3:])
        out["shards_wall_seconds"] = time.perf_counter() - start
        out["shards_result"] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"wrote shards {shards} in {out['shards_wall_seconds']:.1f} s")
    out["folder"], out["shards"] = str(root), str(shards)
    out["shards_bytes"] = sum(p.stat().st_size for p in shards.iterdir())
    out["shard_files"] = len(list(shards.glob("train-*.tar")))
    return out


def data_paths(args, cache: Path) -> tuple[Path, Path]:
    tag = f"synthetic-in{args.classes}-{args.samples}"
    return cache / tag, cache / f"{tag}-wds{args.shard_size}"


def scan_subset(shards: Path, count: int) -> Path:
    """A folder of hard links to the first `count` training shards, without their indexes (so kdkit
    scans them), next to the shards; built once."""
    sub = shards.with_name(shards.name + f"-noindex{count}")
    if not sub.is_dir():
        with tempfile.TemporaryDirectory(dir=shards.parent, prefix=f".{sub.name}-") as tmp:
            for src in sorted(shards.glob("train-*.tar"))[:count]:
                os.link(src, Path(tmp) / src.name)
            os.replace(tmp, sub)
            os.chmod(sub, 0o755)
            Path(tmp).mkdir()
    return sub


# --- memory of a process tree ------------------------------------------------------------------------

def smaps(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS (private clean + dirty) in bytes, from /proc/PID/smaps_rollup (None: gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[-1] == "kB":
            kb[key] = int(parts[0])
    return {"rss": kb.get("Rss", 0) * 1024, "pss": kb.get("Pss", 0) * 1024,
            "uss": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024}


def children(pid: int) -> list[int]:
    """The child processes of `pid` (by the parent field of /proc/*/stat: no psutil here)."""
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


# --- probes: each runs in a fresh process and prints one JSON line ------------------------------------

def self_memory() -> dict:
    """This process's smaps figures, plus its peak RSS so far (VmHWM)."""
    out = smaps(os.getpid())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["peak_rss"] = int(line.split()[1]) * 1024
    return out


def probe_open(kind: str, path: str, split: str) -> dict:
    """Open a training split in this (fresh) process: seconds to import, to open, and the memory after."""
    t0 = time.perf_counter()
    if kind.startswith("kdkit"):
        from kdkit.data import open_dataset
    else:
        from timm.data import create_dataset
    imported = time.perf_counter() - t0
    before = self_memory()
    start = time.perf_counter()
    if kind == "kdkit":
        ds = open_dataset(path, split)
    elif kind == "timm-folder":
        ds = create_dataset("", root=path, split=split)
    else:  # timm-wds: streams, so opening reads only _info.json
        ds = create_dataset(f"wds/{Path(path).name}", root=path, split=split, batch_size=BATCH, is_training=True)
    out = {"import_seconds": imported, "open_seconds": time.perf_counter() - start, "samples": len(ds),
           "memory_after_import": before,
           "memory_after_open": self_memory()}
    if kind == "kdkit":
        out.update(fingerprint_and_manifest(ds, path, split))
    return out


def fingerprint_and_manifest(ds, path: str, split: str) -> dict:
    """kdkit's data fingerprint (data_identity) and a logit-cache manifest built from it, timed."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from kdkit.cache.manifest import build_manifest, data_identity
    from kdkit.config import AugConfig
    from kdkit.data import view_settings

    start = time.perf_counter()
    identity = data_identity(ds, path, split)
    fp_seconds = time.perf_counter() - start
    import dataclasses

    data_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
    start = time.perf_counter()
    views = view_settings(data_cfg, dataclasses.asdict(AugConfig()))
    manifest = build_manifest(mode="replay", teacher={"name": "t", "weights_sha256": "0" * 64}, data=identity,
                              views=views, seed=0, epochs=1, topk=10, dtype="float16", shard_size=4096)
    text = json.dumps(manifest, indent=2)
    return {"fingerprint_seconds": fp_seconds, "manifest_seconds": time.perf_counter() - start,
            "manifest_json_bytes": len(text.encode()), "memory_after_fingerprint": self_memory()}


def probe_first_batch(kind: str, path: str) -> dict:
    """timm: process start to the first batch out of its loader (8 workers, batch 256, 32 px training)."""
    from timm.data import create_dataset, create_loader

    if kind == "timm-folder":
        ds = create_dataset("", root=path, split="train", is_training=True)
    else:
        ds = create_dataset(f"wds/{Path(path).name}", root=path, split="train", batch_size=BATCH, is_training=True)
    loader = create_loader(ds, input_size=(3, 32, 32), batch_size=BATCH, is_training=True, use_prefetcher=False,
                           num_workers=WORKERS)
    images, target = next(iter(loader))
    return {"batch_shape": list(images.shape), "samples": len(ds) if hasattr(ds, "__len__") else None}


def probe_pass(kind: str, path: str, batches: int, progress: str) -> dict:
    """A pass of `batches` batches of 256 in a shuffled order (eval transform, 32 px, 8 workers);
    writes the number of batches done to `progress` as it goes, "done" at the end, then waits 3 s
    (the workers alive) so that the sampler records the end state."""
    import torch

    torch.set_num_threads(1)
    if kind.startswith("kdkit"):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        from kdkit.data import create_loader, eval_transform, open_dataset

        ds = open_dataset(path, "train")
        data_cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                    "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0}
        ds.transform = eval_transform(data_cfg)
        loader = create_loader(ds, BATCH, training=True, workers=WORKERS, seed=0)
    else:
        from timm.data import create_dataset, create_transform
        from torch.utils.data import DataLoader

        ds = create_dataset("", root=path, split="train",
                            transform=create_transform(32, is_training=False, crop_pct=1.0, interpolation="bicubic"))
        loader = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True,
                            generator=torch.Generator().manual_seed(0), persistent_workers=True)
    Path(progress).write_text("0")
    start = time.perf_counter()
    samples = 0
    for i, batch in enumerate(loader):
        samples += len(batch["target"] if isinstance(batch, dict) else batch[1])
        if (i + 1) % 10 == 0:
            Path(progress).write_text(str(i + 1))
        if i + 1 >= batches:
            break
    seconds = time.perf_counter() - start
    Path(progress).write_text("done")
    time.sleep(3)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds, "dataset_len": len(ds)}


def run_probe(args_list: list[str], timeout: float = 3600) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "scale.py"), "--probe", *args_list], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode:
        sys.exit(f"error: probe {args_list} failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- stages ------------------------------------------------------------------------------------------

def stage_open(args, root: Path, shards: Path, log) -> dict:
    out = {}
    sub = scan_subset(shards, args.scan_shards)
    for name, probe in (("kdkit_folder", ["open", "kdkit", str(root), "train"]),
                        ("timm_folder", ["open", "timm-folder", str(root), "train"]),
                        ("kdkit_shards_indexed", ["open", "kdkit", str(shards), "train"]),
                        ("kdkit_shards_scan", ["open", "kdkit", str(sub), "train"]),
                        ("timm_wds", ["open", "timm-wds", str(shards), "train"])):
        out[name] = run_probe(probe)
        log(f"  open {name}: {out[name]['open_seconds']:.2f} s, {out[name]['samples']} samples")
    out["kdkit_shards_scan"]["shards"] = args.scan_shards
    return out


def newest_metrics(folder: Path) -> Path | None:
    found = sorted(folder.rglob("metrics.jsonl"))
    return found[0] if found else None


def kdkit_first_step(data: Path, tmp: Path, timeout: float) -> dict:
    """`kdkit train` from the command to the first line of metrics.jsonl holding a step."""
    cmd = ["kdkit", "train", "--model", "resnet10t", "--data", str(data), "--img-size", "32", "--set",
           "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}", "--epochs", "1", "--batch-size", str(BATCH),
           "--workers", str(WORKERS), "--set", "run.log_every=1", "--no-progress", "--output", str(tmp),
           "--name", "x"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seconds = None
    try:
        while time.perf_counter() - start < timeout and proc.poll() is None:
            metrics = newest_metrics(tmp)
            if metrics is not None and any('"step"' in line for line in metrics.read_text().splitlines()):
                seconds = time.perf_counter() - start
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if seconds is None:
        sys.exit(f"error: {' '.join(cmd)} logged no step in {timeout:.0f} s: {proc.stderr.read()[-1500:]}")
    return {"seconds": seconds, "command": " ".join(f"'{c}'" if " " in c else c for c in cmd)}


def timm_first_batch(kind: str, data: Path) -> dict:
    start = time.perf_counter()
    res = run_probe(["first-batch", kind, str(data)])
    res["seconds"] = time.perf_counter() - start
    return res


def stage_first_step(args, root: Path, shards: Path, log) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="kdkit-scale-") as tmp:
        for name, data in (("kdkit_folder", root), ("kdkit_shards", shards)):
            out[name] = kdkit_first_step(data, Path(tmp) / name, args.timeout)
            log(f"  first step {name}: {out[name]['seconds']:.1f} s")
    for name, kind, data in (("timm_folder", "timm-folder", root), ("timm_wds", "timm-wds", shards)):
        out[name] = timm_first_batch(kind, data)
        log(f"  first batch {name}: {out[name]['seconds']:.1f} s")
    return out


def sample_tree(kind: str, path: Path, batches: int, log) -> dict:
    """Run a pass probe and sample its memory (main process and workers) every second."""
    with tempfile.TemporaryDirectory(prefix="kdkit-scale-mem-") as tmp:
        progress = Path(tmp) / "progress"
        proc = subprocess.Popen([sys.executable, str(HERE / "scale.py"), "--probe", "pass", kind, str(path),
                                 str(batches), str(progress)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        series = []
        start = time.perf_counter()
        while proc.poll() is None:
            state = progress.read_text() if progress.is_file() else ""
            main = smaps(proc.pid)
            workers = {pid: smaps(pid) for pid in children(proc.pid)}
            series.append({"t": time.perf_counter() - start, "progress": state, "main": main,
                           "workers": [m for m in workers.values() if m]})
            if state == "done" and series[-2:-1] and series[-2]["progress"] == "done":
                pass  # the probe sleeps 3 s after "done": samples until it exits
            time.sleep(1.0)
        stdout, stderr = proc.communicate()
        if proc.returncode:
            sys.exit(f"error: the {kind} pass failed: {stderr.strip()[-1500:]}")
        result = json.loads(stdout.strip().splitlines()[-1])
    full = [s for s in series if len(s["workers"]) == WORKERS and s["main"]]
    if not full:
        sys.exit(f"error: the {kind} pass never showed {WORKERS} workers")
    # start: the first sample after WARM batches (every worker has run a few: its imports, decoder
    # buffers and allocator arenas are in place), so that start -> end is what grows with the pass
    warm = [s for s in full if s["progress"] == "done" or (s["progress"].isdigit() and int(s["progress"]) >= WARM)]
    begin = (warm or full)[0]
    end = ([s for s in full if s["progress"] == "done"] or full)[-1]
    peak = max(full, key=lambda s: sum(w["uss"] for w in s["workers"]))
    summary = {"pass": result, "samples_taken": len(series),
               "spawn": {"t": full[0]["t"], "main": full[0]["main"], "workers": full[0]["workers"]},
               "start": {"t": begin["t"], "batches": begin["progress"], "main": begin["main"],
                         "workers": begin["workers"]},
               "end": {"t": end["t"], "main": end["main"], "workers": end["workers"]},
               "peak_workers_uss_total": sum(w["uss"] for w in peak["workers"]),
               "series_every_5s": [{"t": round(s["t"], 1), "progress": s["progress"],
                                    "main_uss": s["main"]["uss"] if s["main"] else None,
                                    "workers_uss": [w["uss"] for w in s["workers"]]} for s in series[::5]]}
    w0 = [w["uss"] for w in begin["workers"]]
    w1 = [w["uss"] for w in end["workers"]]
    summary["worker_uss_start_mean"] = sum(w0) / len(w0)
    summary["worker_uss_end_mean"] = sum(w1) / len(w1)
    summary["worker_uss_growth_mean"] = summary["worker_uss_end_mean"] - summary["worker_uss_start_mean"]
    log(f"  memory {kind}: {result['samples']} samples in {result['seconds']:.0f} s; worker USS "
        f"{summary['worker_uss_start_mean'] / 2**20:.1f} -> {summary['worker_uss_end_mean'] / 2**20:.1f} MiB, "
        f"main USS {end['main']['uss'] / 2**20:.0f} MiB")
    return summary


def stage_memory(args, root: Path, shards: Path, log) -> dict:
    batches = max(int(args.fraction * args.samples) // BATCH, 1)
    out = {"fraction": args.fraction, "batches": batches, "order": "shuffled (training order), eval transform"}
    for name, kind, data in (("kdkit_folder", "kdkit", root), ("kdkit_shards", "kdkit", shards),
                             ("timm_folder", "timm-folder", root)):
        out[name] = sample_tree(kind, data, batches, log)
    return out


def stage_cache(args, cache: Path, log) -> dict:
    """Write a 1.28M-record replay cache of random logits and read it all in epoch order."""
    import torch

    from kdkit.cache import FORMAT, LogitCache
    from kdkit.cache.store import LogitStore, encode_record, record_bytes
    from kdkit.data.sampler import epoch_views

    torch.set_num_threads(1)
    records, classes, shard_size = args.samples, 1000, 4096
    manifest = {"format": FORMAT, "mode": "replay", "epochs": 1, "repeats": 1, "seed": 0,
                "num_classes": classes, "topk": 10, "dtype": "float16", "records_per_epoch": records,
                "shard_size": shard_size, "unlabeled": None}
    with tempfile.TemporaryDirectory(dir=cache, prefix=".logits-") as tmp:
        root = Path(tmp)
        (root / "shards").mkdir()
        (root / "manifest.json").write_text(json.dumps(manifest))
        store = LogitStore(root, manifest)
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for shard in range(store.shards_per_epoch()):
            n = min(shard_size, records - shard * shard_size)
            store.write(0, shard, encode_record(torch.randn(n, classes, generator=g) * 3, 10, torch.float16))
        write_seconds = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in (root / "shards").iterdir())
        order = epoch_views(records, 0, 0, 1)
        reader = LogitCache(root)  # checks each shard's sha256 on first map, as a training run does
        start = time.perf_counter()
        for i in range(0, records, BATCH):
            reader.lookup(0, order[i:i + BATCH])
        seconds = time.perf_counter() - start
    per = record_bytes(10, classes, "float16")
    out = {"records": records, "classes": classes, "topk": 10, "dtype": "float16", "shard_size": shard_size,
           "record_bytes": per, "bytes_on_disk": on_disk, "write_seconds": write_seconds, "read_seconds": seconds,
           "records_per_s": records / seconds, "mb_per_s": records * per / seconds / 1e6,
           "note": "page cache warm (the shards were just written); sha256 of each shard checked on first map"}
    log(f"  cache: {on_disk / 1e6:.0f} MB, read {records} records in {seconds:.1f} s = {records / seconds:,.0f} /s")
    return out


# --- report ------------------------------------------------------------------------------------------

def scaled(value: float, n: int) -> tuple[float, float]:
    """(per million samples, at ImageNet-21k's size) of a figure proportional to the sample count."""
    per = value * MILLION / n
    return per, per * IMAGENET_21K / MILLION


def rows(res: dict, n: int) -> list[dict]:
    """The table: one row per figure, with kdkit's and timm's value at n samples, per million and at
    14M (a figure that does not grow with the data is carried over as is), and whether kdkit's grows
    no faster than timm's."""
    out = []

    def add(measure, unit, kdkit, timm, grows=True, note="", timm_grows=None):
        timm_grows = grows if timm_grows is None else timm_grows
        row = {"measure": measure, "unit": unit, "kdkit": kdkit, "timm": timm, "grows_with_data": grows,
               "timm_grows_with_data": timm_grows, "note": note}
        for who, g in (("kdkit", grows), ("timm", timm_grows)):
            v = row[who]
            if v is not None:
                row[f"{who}_per_million"], row[f"{who}_at_14m"] = scaled(v, n) if g else (None, v)
        if kdkit is not None and timm is not None:  # compared at 14M (10%: a shared machine's noise)
            row["no_faster_than_timm"] = row["kdkit_at_14m"] <= row["timm_at_14m"] * 1.10
        out.append(row)

    gen = res.get("generate", {})
    if "shards_wall_seconds" in gen:
        add("write shards (kdkit shards, train+val)", "s", gen["shards_wall_seconds"] * n
            / (n + gen["shards_result"]["samples"].get("val", 0)), None, note="timm has no shard writer")
    o = res.get("open")
    if o:
        mib = 2**20

        def grown(r):
            return (r["memory_after_open"]["uss"] - r["memory_after_import"]["uss"]) / mib

        add("open train split, folder", "s", o["kdkit_folder"]["open_seconds"], o["timm_folder"]["open_seconds"])
        add("main-process memory of the sample list, folder (USS after open - before)", "MiB",
            grown(o["kdkit_folder"]), grown(o["timm_folder"]))
        add("open train split, shards with .idx.npz", "s", o["kdkit_shards_indexed"]["open_seconds"],
            o["timm_wds"]["open_seconds"], timm_grows=False, note="timm's wds reader reads only _info.json: it streams")
        scan = o["kdkit_shards_scan"]
        add(f"open shards without indexes (scan; {scan['shards']} shards, scaled)", "s",
            scan["open_seconds"] * n / scan["samples"], o["timm_wds"]["open_seconds"], timm_grows=False)
        add("main-process memory of the sample list, shards", "MiB", grown(o["kdkit_shards_indexed"]),
            grown(o["timm_wds"]), timm_grows=False)
        add("fingerprint, folder (data_identity: stat of every file)", "s", o["kdkit_folder"]["fingerprint_seconds"],
            None, note="timm computes none (it has no logit cache)")
        add("fingerprint, shards (data_identity)", "s", o["kdkit_shards_indexed"]["fingerprint_seconds"], None)
        add("cache manifest build (from data_identity)", "s", o["kdkit_folder"]["manifest_seconds"], None, grows=False)
        add("cache manifest JSON size (1,000 class names)", "KB", o["kdkit_folder"]["manifest_json_bytes"] / 1e3, None,
            grows=False, note="grows with the classes, not the samples")
    f, at14 = res.get("first-step"), first_step_at_14m(res, n)
    if f:
        for src, k, t in (("folder", "kdkit_folder", "timm_folder"), ("shards", "kdkit_shards", "timm_wds")):
            add(f"command to first step / first batch, {src}", "s", f[k]["seconds"], f[t]["seconds"], grows=False,
                note="@14M: measured + open scaled to 14M (kdkit fingerprints the data after training, "
                     "or before the first step only when a logit cache is read or written)")
            if at14:
                out[-1].update(kdkit_at_14m=at14[k], timm_at_14m=at14[t],
                               no_faster_than_timm=at14[k] <= at14[t] * 1.10)
    m = res.get("memory")
    if m:
        for src, k in (("folder", "kdkit_folder"), ("shards", "kdkit_shards")):
            t = m["timm_folder"]
            add(f"per-worker USS growth over the pass, {src} (timm: folder)", "MiB",
                m[k]["worker_uss_growth_mean"] / 2**20, t["worker_uss_growth_mean"] / 2**20)
            add(f"all 8 workers' USS at the end, {src} (timm: folder)", "MiB",
                sum(w["uss"] for w in m[k]["end"]["workers"]) / 2**20,
                sum(w["uss"] for w in t["end"]["workers"]) / 2**20)
            add(f"pass rate, {src} (timm: folder; 8 workers, 2 cores)", "samples/s",
                m[k]["pass"]["samples_per_s"], t["pass"]["samples_per_s"], grows=False)
    c = res.get("cache")
    if c:
        add("logit cache on disk (top-10 of 1000, fp16)", "MB", c["bytes_on_disk"] / 1e6, None)
        add("logit cache read, epoch order, batches of 256", "records/s", c["records_per_s"], None, grows=False)
        add("logit cache read time for one epoch", "s", c["read_seconds"], None)
    return out


def first_step_at_14m(res: dict, n: int) -> dict:
    """Command-to-first-step at 14M: the measured time plus what grows with the data before the
    first step (opening the split) scaled from n to 14M samples. kdkit's fingerprint of the data is
    not in it: `kdkit train` computes it after training, for the summary (a run that reads or
    writes a logit cache computes it first; see the fingerprint rows)."""
    f, o = res.get("first-step"), res.get("open")
    if not f or not o:
        return {}
    grow = IMAGENET_21K / n - 1
    return {"kdkit_folder": f["kdkit_folder"]["seconds"] + grow * o["kdkit_folder"]["open_seconds"],
            "kdkit_shards": f["kdkit_shards"]["seconds"] + grow * o["kdkit_shards_indexed"]["open_seconds"],
            "timm_folder": f["timm_folder"]["seconds"] + grow * o["timm_folder"]["open_seconds"],
            "timm_wds": f["timm_wds"]["seconds"]}


def table(table_rows: list[dict], n: int):
    from rich.table import Table

    t = Table(title=f"ImageNet-scale data: {n:,} training samples (shared 2-core machine; @14M: extrapolated)")
    for col in ("measure", "unit", "kdkit", "timm", "kdkit /1M", "timm /1M", "kdkit @14M", "timm @14M",
                "kdkit <= timm"):
        t.add_column(col, justify="left" if col == "measure" else "right")

    def fmt(v):
        return "" if v is None else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"

    for r in table_rows:
        ok = r.get("no_faster_than_timm")
        t.add_row(r["measure"], r["unit"], fmt(r["kdkit"]), fmt(r["timm"]), fmt(r.get("kdkit_per_million")),
                  fmt(r.get("timm_per_million")), fmt(r.get("kdkit_at_14m")), fmt(r.get("timm_at_14m")),
                  "" if ok is None else "yes" if ok else "NO")
    return t


def machine() -> dict:
    import timm
    import torch

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "shared_machine": "timings taken on a machine shared with other jobs: see loadavg per stage",
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__}


def probe_main(argv: list[str]) -> None:
    name, *rest = argv
    if name == "open":
        out = probe_open(*rest)
    elif name == "first-batch":
        out = probe_first_batch(*rest)
    elif name == "pass":
        out = probe_pass(rest[0], rest[1], int(rest[2]), rest[3])
    else:
        sys.exit(f"error: unknown probe {name}")
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        return probe_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--samples", type=int, default=IMAGENET_1K, help="training samples (default: ImageNet-1k's)")
    p.add_argument("--val-samples", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per tar shard")
    p.add_argument("--scan-shards", type=int, default=10, help="shards opened without their indexes")
    p.add_argument("--fraction", type=float, default=1.0, help="part of the training set the memory pass reads")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a kdkit train may take to its first step")
    p.add_argument("--cache-dir", default=os.environ.get("KDKIT_BENCH_CACHE", "~/.cache/kdkit-bench"))
    p.add_argument("--tarball", default=str(TARBALL))
    p.add_argument("--json", default="bench/results/scale.json")
    args = p.parse_args()
    if not 0 < args.fraction <= 1 or args.samples < BATCH or args.classes < 1:
        sys.exit("error: --fraction must be in (0, 1], --samples >= 256 and --classes >= 1")
    from rich.console import Console

    err = Console(stderr=True)

    def log(s):
        err.print(s, highlight=False)

    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    path = Path(args.json)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if previous.get("samples") != args.samples:
        previous = {}  # another set's results: start afresh
    results = previous.get("stages", {})
    root, shards = data_paths(args, cache)
    if "generate" not in args.stages and not (shards / "_info.json").is_file():
        sys.exit(f"error: {shards} not found: run the generate stage first")
    for stage in STAGES:
        if stage not in args.stages:
            continue
        load, start = os.getloadavg(), time.perf_counter()
        log(f"stage {stage} (load average {load[0]:.2f})")
        if stage == "generate":
            res = generate(args, cache, log)
            res.update({k: v for k, v in results.get("generate", {}).items() if k not in res})  # keep build times
        elif stage == "open":
            res = stage_open(args, root, shards, log)
        elif stage == "first-step":
            res = stage_first_step(args, root, shards, log)
        elif stage == "memory":
            res = stage_memory(args, root, shards, log)
        else:
            res = stage_cache(args, cache, log)
        res["loadavg_start"], res["loadavg_end"] = load, os.getloadavg()
        res["stage_seconds"] = time.perf_counter() - start
        res["command"] = "python bench/scale.py " + " ".join(sys.argv[1:])
        results[stage] = res
    table_rows = rows(results, args.samples)
    out = {"bench": "scale", "samples": args.samples, "classes": args.classes, "val_samples": args.val_samples,
           "kdkit": kdkit_source(), "machine": machine(), "stages": results, "table": table_rows,
           "first_step_at_14m": first_step_at_14m(results, args.samples), "imagenet_21k_samples": IMAGENET_21K}
    Console(width=200).print(table(table_rows, args.samples))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "stages"}))


if __name__ == "__main__":
    main()

"""Training throughput and the student's model-FLOPs utilisation (MFU) on one GPU: DeiT-Ti
distilled from RegNetY-16GF at 224 px in bf16.

    python bench/gpu_throughput.py --data DIR [--teacher-weights FILE] [--cache DIR]
    python bench/gpu_throughput.py --dry-run          # CPU proof: tiny sizes, a few steps, fp32

Three modes, each with and without torch.compile (six configurations, one process):
  plain    the student trained on labels alone (`kdkit train`: loss "none"), no teacher;
  online   DeiT hard distillation with the live teacher (`kdkit distill --teacher`);
  cached   the same loss, the teacher's logits read from a replay cache (`kdkit distill --logit-cache`),
           written first by the code behind `kdkit cache` (kdkit.engine.caching.cache_teacher).

What a step is: kdkit's own `train_step` (engine/loop.py: DistillationStep forward, the non-finite
check, backward, AdamW step) on a batch moved to the GPU by `make_batch`, under the Accelerator of
the recipe (bf16 autocast). The recipe is the bundled `deit_tiny_imagenet` (DeiT's augmentation,
Mixup/CutMix, hard distillation, drop_path 0.1) with data.batch_size = --batch-size and
repeated_aug off. The batches are drawn once, before timing, by kdkit's loader (augmented views,
per-sample Mixup/CutMix) and kept in pinned host memory: the CPU data pipeline is left out (it is
measured by bench/data_pipeline.py and by gpu.sh's optional end-to-end runs), the host-to-device
copy is not. torch.compile: the bench calls `module.compile()` on the (prepared) student and on the
teacher's network, as kdkit's run.compile does for the teacher.

Timing: --warmup untimed steps (the first also compiles), then --windows windows of --steps steps,
each window between two torch.cuda.synchronize(); images/s per window = steps x batch / seconds;
the median (min, max) is reported. MFU = student training FLOPs per image (3 x the forward FLOPs
counted by torch.utils.flop_counter.FlopCounterMode at batch 1, fp32; 2 FLOPs per multiply-add,
matmuls/convs/attention only) x images/s / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200
SXM; --peak-tflops overrides). "all-model MFU" adds the teacher's forward FLOPs (online only). A
bf16 8192^3 matmul is timed as well, for the ceiling actually reachable on this GPU.

Data: an ImageFolder at --data (train/, val/ of class folders). When it does not exist it is made
there: --images training and --val-images validation JPEGs (500x375, quality 90, --classes class
folders, image i in class i mod classes), from CIFAR-10 training images upscaled bicubic (read
straight out of --tarball, default /work/shared/data/cifar10-jpg.tar.gz or
runs/cifar10-jpg.tar.gz) or, without the tarball, synthetic smooth noise images. The teacher's
weights are random (throughput does not depend on them): --teacher-weights FILE is written as
safetensors when missing. No hub downloads anywhere.

Writes --json (default bench/results/gpu_throughput.json; dry-run: gpu_throughput_dryrun.json)
after every configuration, prints a table and the JSON at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import kdkit_source  # noqa: E402

# dense bf16 peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name(); first match wins
PEAKS = (("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
         ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
         ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12))
TARBALLS = ("/work/shared/data/cifar10-jpg.tar.gz", "runs/cifar10-jpg.tar.gz", "shared/data/cifar10-jpg.tar.gz")
UPSCALED, QUALITY = (500, 375), 90
MODES = ("plain", "online", "cached")


def log(msg: str) -> None:
    print(f"[gpu_throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- data and weights -------------------------------------------------------------------------------

def _encode(job: tuple[int, bytes | None, str, int]) -> None:
    """Write one 500x375 JPEG: a decoded CIFAR image (bytes) upscaled, or synthetic noise (None)."""
    i, data, dst, size = job
    if data is not None:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    else:
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))  # smooth after upscaling
    img.resize(UPSCALED, Image.BICUBIC).save(dst, "JPEG", quality=QUALITY)


def cifar_bytes(tarball: Path | None, n: int) -> list[bytes | None]:
    """The first n training JPEGs of the CIFAR-10 tarball (cycled if it holds fewer), or n Nones."""
    if tarball is None:
        return [None] * n
    out: list[bytes | None] = []
    with tarfile.open(tarball) as tar:
        for member in tar:
            if member.isfile() and "/train/" in member.name and member.name.endswith(".jpg"):
                out.append(tar.extractfile(member).read())
                if len(out) == n:
                    break
    return [out[i % len(out)] for i in range(n)] if out else [None] * n


def make_data(root: Path, images: int, val_images: int, classes: int, tarball: Path | None) -> dict:
    """An ImageFolder of ImageNet-sized JPEGs at root (train/ and val/), unless one is there."""
    info = {"path": str(root), "classes": classes, "size": list(UPSCALED), "jpeg_quality": QUALITY}
    if (root / ".complete").is_file():
        return {**info, **json.loads((root / ".complete").read_text()), "reused": True}
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    sources = cifar_bytes(tarball, images + val_images)
    jobs = []
    for split, lo, n in (("train", 0, images), ("val", images, val_images)):
        for k in range(n):
            folder = root / split / f"n{k % classes:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((lo + k, sources[lo + k], str(folder / f"{lo + k:06d}.jpg"), 0))
    with ProcessPoolExecutor(min(os.cpu_count() or 1, 16)) as pool:
        list(pool.map(_encode, jobs, chunksize=32))
    made = {"images": images, "val_images": val_images,
            "source": f"CIFAR-10 training JPEGs from {tarball}, upscaled bicubic" if tarball
            else "synthetic: 16x12 uniform noise upscaled bicubic"}
    (root / ".complete").write_text(json.dumps(made))
    log(f"made {images} + {val_images} JPEGs in {root} in {time.perf_counter() - start:.1f} s ({made['source']})")
    return {**info, **made, "reused": False}


def find_tarball(arg: str) -> Path | None:
    if arg == "none":
        return None
    for p in ([arg] if arg else TARBALLS):
        if Path(p).is_file():
            return Path(p)
    return None


def random_teacher_weights(name: str, path: Path, classes: int) -> None:
    """Random-init weights of `name` with `classes` outputs, saved as safetensors (no hub access)."""
    if path.is_file():
        return
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    log(f"saved random {name} weights ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) to {path}")


# --- kdkit's pieces, called as the trainer calls them (tolerant of signature changes) ----------------

def call(fn, *args, **maybe):
    """fn(*args, **the keywords of `maybe` that fn accepts)."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return fn(*args, **{k: v for k, v in maybe.items() if takes_all or k in params})


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def memory_format(model: torch.nn.Module) -> str:
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        return "n/a"
    return "channels_last" if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
        not conv.weight.is_contiguous() else "contiguous"


@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    acc: object
    device: torch.device
    recipe: object  # the run's Recipe (run.compile off: the bench compiles)
    train_ds: object
    data_cfg: dict
    num_classes: int
    batches: list


def recipe_for(args, mode: str, **extra) -> object:
    from kdkit.config import load_recipe

    over = {"data": {"path": args.data, "batch_size": args.batch_size, "workers": args.workers},
            "aug": {"repeated_aug": 0}, "optim": {"epochs": 1},
            "run": {"precision": args.precision, "progress": False, "seed": 0},
            "model": {"teacher": args.teacher, "teacher_weights": args.teacher_weights, "student": args.student}}
    if args.img_size != 224 or args.patch_size:
        over["model"].update(img_size=args.img_size, **({"patch_size": args.patch_size} if args.patch_size else {}))
    if mode == "cached":
        over["model"]["logit_cache"] = args.cache
    for k, v in extra.items():
        over.setdefault(k, {}).update(v)
    return load_recipe(args.recipe, over)


def setup(args) -> Setup:
    from kdkit.data import create_loader, view_settings, with_views
    from kdkit.engine import build as R

    r = recipe_for(args, "plain")
    acc = R.make_accelerator(r)
    train_ds = R.open_train(r)
    k = len(train_ds.classes)
    probe = R.build_student(r, "distill", None, k)
    data_cfg = R.student_data_config(probe, r.model.img_size)
    del probe
    train_ds = with_views(train_ds, view_settings(data_cfg, dataclasses.asdict(r.aug)), k)
    # as the trainer does: on CUDA the batches stay uint8 and make_batch finishes them (timed with the step)
    on_device = acc.device.type == "cuda" and getattr(r.data, "prefetcher", False)
    loader = create_loader(train_ds, args.batch_size, training=True, workers=args.workers, seed=r.run.seed,
                           **({"finish_on_device": True} if on_device else {}))
    try:
        from kdkit.data.sampler import seek

        seek(loader, 0)
    except ImportError:
        loader.sampler.set_epoch(0)
        train_ds.set_epoch(0)
    start, batches = time.perf_counter(), []
    for raw in loader:
        if raw["images"] is not None:
            if acc.device.type == "cuda" and not raw["images"].is_pinned():
                raw["images"] = raw["images"].pin_memory()
            batches.append(raw)
        if len(batches) == args.stage_batches:
            break
    if not batches:
        sys.exit(f"error: {len(train_ds)} training images make no batch of {args.batch_size}")
    log(f"staged {len(batches)} batches of {args.batch_size} (epoch 0, {len(loader)} in the epoch) in "
        f"{time.perf_counter() - start:.1f} s with {args.workers} workers")
    return Setup(args, acc, acc.device, r, train_ds, data_cfg, k, batches)


def build_teacher(s: Setup, compiled: bool) -> torch.nn.Module:
    """The recipe's teacher as the trainer builds it (precision and memory format too, where this
    kdkit does so), bf16 autocast on CUDA if the builder left it in full precision, compiled on request."""
    from kdkit.engine import build as R

    t = call(R.build_teacher, s.recipe, None, s.num_classes, s.data_cfg, acc=s.acc).to(s.device)
    t.bench_forced_bf16 = s.device.type == "cuda" and s.args.precision == "bf16" and \
        getattr(t, "amp_dtype", None) is None
    if t.bench_forced_bf16:  # an older kdkit left the teacher in fp32 under a bf16 run
        t.amp_dtype = torch.bfloat16
    if s.args.teacher_channels_last == "on" and memory_format(t.model) != "channels_last":
        t.model.to(memory_format=torch.channels_last)
    if compiled and not is_compiled(t.model):
        t.model.compile(backend=s.args.compile_backend)
    return t


def write_cache(s: Setup) -> dict:
    """The replay cache of the teacher on the training split (epoch 0), written by the code behind
    `kdkit cache`; a complete cache with the same settings is kept (nothing is recomputed), a
    different one replaced."""
    from kdkit.engine.caching import cache_teacher

    r = recipe_for(s.args, "plain", data={"eval_batch_size": max(s.args.batch_size, 64)})
    start = time.perf_counter()
    stats = call(cache_teacher, r, Path(s.args.cache), mode="replay", overwrite=True)
    stats = {k: v for k, v in stats.items() if isinstance(v, int | float | str)}
    log(f"replay cache {s.args.cache} ready in {time.perf_counter() - start:.1f} s: {stats}")
    return {"cache": str(s.args.cache), "seconds": time.perf_counter() - start, **stats}


def logit_source(s: Setup, mode: str, compiled: bool, teachers: dict):
    from kdkit.sources import CachedLogits, LiveTeacher

    if mode == "plain":
        return None
    if mode == "online":
        if compiled not in teachers:
            teachers[compiled] = build_teacher(s, compiled)
        return LiveTeacher(teachers[compiled])
    from kdkit.engine import build as R

    r = recipe_for(s.args, "cached")
    try:  # as the trainer does: the cache is checked against this run's data, views and seed
        return R.build_logit_source(r, None, s.data_cfg, s.train_ds, None, s.acc, {})
    except TypeError:
        return CachedLogits(s.args.cache)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(s: Setup, mode: str, compiled: bool, teachers: dict) -> dict:
    from kdkit.engine import build as R
    from kdkit.engine.step import DistillationStep, make_batch, train_step

    a, acc = s.args, s.acc
    verb = "train" if mode == "plain" else "distill"
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    torch.manual_seed(0)
    student = R.build_student(s.recipe, verb, None, s.num_classes)
    optimizer, _scheduler, _lr = call(R.build_optimizer, s.recipe, student, len(s.batches), device=s.device)
    student, optimizer = acc.prepare(student, optimizer)
    if compiled and not is_compiled(student):
        student.compile(backend=a.compile_backend)
    logits = logit_source(s, mode, compiled, teachers)
    loss = R.build_loss(s.recipe, R.loss_kind(s.recipe, verb), s.train_ds.mixup is not None)
    step_fn = DistillationStep(loss, logits)
    student.train()
    clip = s.recipe.optim.clip_grad
    i = 0

    def steps(n: int) -> float:
        nonlocal i
        sync(s.device)
        start = time.perf_counter()
        for _ in range(n):
            raw = s.batches[i % len(s.batches)]
            i += 1
            _out, _values, bad = train_step(acc, student, optimizer, step_fn, make_batch(raw, s.device), clip)
            if bad:
                raise RuntimeError(f"non-finite loss in the benchmark ({bad})")
        sync(s.device)
        return time.perf_counter() - start

    first = steps(1)  # compiles, when compiled
    warm = steps(a.warmup) if a.warmup else 0.0
    windows = [a.steps * a.batch_size / steps(a.steps) for _ in range(a.windows)]
    out = {"mode": mode, "compile": compiled, "first_step_s": first, "warmup_s": warm,
           "images_per_s": statistics.median(windows), "images_per_s_min": min(windows),
           "images_per_s_max": max(windows), "windows": windows, "loss": type(loss).__name__,
           "peak_memory_gib": torch.cuda.max_memory_allocated(s.device) / 2**30 if s.device.type == "cuda" else None}
    if mode == "online":
        t = teachers[compiled]
        out["teacher"] = {"amp_dtype": str(t.amp_dtype), "bf16_forced_by_bench": t.bench_forced_bf16,
                          "memory_format": memory_format(t.model),
                          "input_size": list(t.input_size or ()), "compiled": is_compiled(t.model)}
    acc.free_memory()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --- FLOPs, peak, report ------------------------------------------------------------------------------

def flops(s: Setup) -> dict:
    from kdkit.engine import build as R
    from kdkit.models.flops import count_flops

    size = s.data_cfg["input_size"]
    student = R.build_student(s.recipe, "distill", None, s.num_classes)
    teacher = call(R.build_teacher, s.recipe, None, s.num_classes, s.data_cfg)
    t_size = tuple(teacher.input_size or size)
    out = {"student_forward": count_flops(student.to(s.device), tuple(size), s.device),
           "teacher_forward": count_flops(teacher.model.to(s.device), t_size, s.device),
           "student_input": list(size), "teacher_input": list(t_size),
           "student_params": sum(p.numel() for p in student.parameters()),
           "teacher_params": sum(p.numel() for p in teacher.model.parameters())}
    out["student_train_per_image"] = 3 * out["student_forward"]
    del student, teacher
    return out


def device_info(args) -> dict:
    if not torch.cuda.is_available():
        return {"name": "cpu", "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None,
                "peak_source": "--peak-tflops" if args.peak_tflops else None}
    name = torch.cuda.get_device_name()
    peak, source = None, None
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        for key, value in PEAKS:
            if key in name:
                peak, source = value, f"dense bf16 datasheet peak for '{key}'"
                break
    props = torch.cuda.get_device_properties(0)
    return {"name": name, "peak_flops": peak, "peak_source": source, "capability": list(torch.cuda.get_device_capability()),
            "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float | None:
    """bf16 n^3 matmul rate on random data (the reachable ceiling), TFLOP/s."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def add_mfu(row: dict, fl: dict, peak: float | None) -> None:
    ips = row["images_per_s"]
    row["student_tflops"] = fl["student_train_per_image"] * ips / 1e12
    row["mfu"] = fl["student_train_per_image"] * ips / peak if peak else None
    if row["mode"] == "online":
        total = fl["student_train_per_image"] + fl["teacher_forward"]
        row["all_model_tflops"] = total * ips / 1e12
        row["all_model_mfu"] = total * ips / peak if peak else None


def table(result: dict):
    from rich.table import Table

    d = result["device"]
    t = Table(title=f"{result['student']} <- {result['teacher']}, {result['img_size']} px, batch "
                    f"{result['batch_size']}, {result['precision']}, {d['name']}")
    for col in ("mode", "compile", "images/s", "min-max", "vs plain", "student TFLOP/s", "MFU", "all-model MFU",
                "1st step s"):
        t.add_column(col, justify="left" if col in ("mode", "compile") else "right")
    plain = {r["compile"]: r["images_per_s"] for r in result["rows"] if r["mode"] == "plain"}
    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["mode"], str(r["compile"]), "error", r["error"][:40], "", "", "", "", "")
            continue
        base = plain.get(r["compile"])

        def pct(x):
            return f"{100 * x:.1f}%" if x is not None else "-"

        t.add_row(r["mode"], "on" if r["compile"] else "off", f"{r['images_per_s']:,.0f}",
                  f"{r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f}",
                  f"{r['images_per_s'] / base:.3f}" if base else "-", f"{r['student_tflops']:.1f}", pct(r["mfu"]),
                  pct(r.get("all_model_mfu")), f"{r['first_step_s']:.1f}")
    return t


def steady_rate(metrics: Path, batch: int, skip: int) -> dict:
    """Steady-state images/s of a CLI run's first epoch from its metrics.jsonl. Each step line
    holds images_per_s = images so far / seconds since the epoch began, so images (step + 1) x batch
    and elapsed time are known at every logged step: the rate between the first logged step >= skip
    and the last one leaves out start-up and compilation."""
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = sorted((x for x in lines if x.get("epoch") == 0 and "images_per_s" in x), key=lambda x: x["step"])
    if len(steps) < 2:
        return {"error": f"{metrics}: fewer than 2 logged steps (set run.log_every=1)"}
    seen = [(x["step"] + 1) * batch for x in steps]
    elapsed = [n / x["images_per_s"] for n, x in zip(seen, steps, strict=True)]
    k = next((i for i, x in enumerate(steps) if x["step"] >= skip), 0)
    k = min(k, len(steps) - 2)
    return {"steady_images_per_s": (seen[-1] - seen[k]) / (elapsed[-1] - elapsed[k]),
            "from_step": steps[k]["step"], "to_step": steps[-1]["step"],
            "epoch_images_per_s": steps[-1]["images_per_s"], "first_step_s": elapsed[0]}


def summarize_runs(args) -> None:
    """gpu.sh's end-to-end CLI runs: steady-state images/s (and MFU, with the helper's FLOP count)."""
    from rich.console import Console
    from rich.table import Table

    fl = json.loads(Path(args.flops_from).read_text()).get("flops") if Path(args.flops_from).is_file() else None
    dev = device_info(args)
    rows = []
    for run in args.summarize_runs:
        name = Path(run).name
        row = {"run": name, "dir": run}
        metrics = Path(run) / "metrics.jsonl"
        row.update(steady_rate(metrics, args.batch_size, args.skip_steps) if metrics.is_file()
                   else {"error": f"no {metrics}"})
        summary = Path(run) / "summary.json"
        if summary.is_file():
            sm = json.loads(summary.read_text())
            row.update(train_seconds=sm.get("train_seconds"), precision=sm.get("precision"))
        if fl and "steady_images_per_s" in row and dev["peak_flops"]:
            row["mfu"] = fl["student_train_per_image"] * row["steady_images_per_s"] / dev["peak_flops"]
        rows.append(row)
    t = Table(title=f"kdkit CLI end to end (data loader included), batch {args.batch_size}, {dev['name']}")
    for col in ("run", "steady images/s", "steps", "epoch images/s", "1st step s", "MFU"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["run"], "error", r["error"][:60], "", "", "")
            continue
        t.add_row(r["run"], f"{r['steady_images_per_s']:,.0f}", f"{r['from_step']}-{r['to_step']}",
                  f"{r['epoch_images_per_s']:,.0f}", f"{r['first_step_s']:.1f}",
                  f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-")
    Console(stderr=True, width=150).print(t)
    out = {"bench": "gpu_e2e", "device": dev, "batch_size": args.batch_size, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY", "0") == "1",
                   help="CPU proof (also DRY=1): tiny sizes, a few steps, fp32, regnety_002 teacher")
    p.add_argument("--work", default=os.environ.get("WORK", "/tmp/kdkit-gpu-bench"),
                   help="folder for the generated data, teacher weights and cache (defaults below)")
    p.add_argument("--data", default="", help="ImageFolder root (made when missing; default WORK/data)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--tarball", default="", help="CIFAR-10 JPEG tarball ('none': synthetic images)")
    p.add_argument("--recipe", default="deit_tiny_imagenet")
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--teacher-weights", default="", help="default WORK/<teacher>-random.safetensors")
    p.add_argument("--teacher-channels-last", choices=("auto", "on"), default="auto",
                   help="auto: as kdkit's builder leaves it; on: force channels_last")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=0)
    p.add_argument("--cache", default="", help="replay cache folder (written when missing; default WORK/cache)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--stage-batches", type=int, default=16, help="distinct batches kept in memory and cycled")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps after the first")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--json", default="")
    p.add_argument("--summarize-runs", nargs="+", metavar="RUN_DIR",
                   help="instead: steady-state images/s of kdkit CLI runs (gpu.sh E2E=1) from their metrics.jsonl")
    p.add_argument("--skip-steps", type=int, default=4, help="with --summarize-runs: steps left out at the start")
    p.add_argument("--flops-from", default="bench/results/gpu_throughput.json",
                   help="with --summarize-runs: a results JSON whose FLOP count gives the MFU")
    args = p.parse_args()
    if args.summarize_runs:
        return summarize_runs(args)
    if args.dry_run:
        # tiny everything; the same code path
        args.img_size, args.patch_size, args.batch_size = 32, 4, 8
        args.images, args.val_images, args.classes, args.stage_batches = 64, 20, 10, 4
        args.teacher, args.precision, args.warmup, args.steps, args.windows = "regnety_002", "no", 1, 2, 2
        args.workers = min(args.workers, 2)
        args.work = str(Path(args.work).with_name(Path(args.work).name + "-dryrun"))
    work = Path(args.work)
    args.data = args.data or str(work / "data")
    args.cache = args.cache or str(work / f"cache-{args.teacher}-{args.img_size}-b{args.batch_size}")
    args.teacher_weights = args.teacher_weights or str(work / f"{args.teacher}-{args.classes}-random.safetensors")
    args.json = args.json or ("bench/results/gpu_throughput_dryrun.json" if args.dry_run
                              else "bench/results/gpu_throughput.json")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --dry-run / DRY=1 on a CPU machine)")
    if args.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        sys.exit("error: this GPU has no bf16")

    import timm

    t0 = time.perf_counter()
    data = make_data(Path(args.data), args.images, args.val_images, args.classes, find_tarball(args.tarball))
    random_teacher_weights(args.teacher, Path(args.teacher_weights), args.classes)
    s = setup(args)
    dev = device_info(args)
    result = {"bench": "gpu_throughput", "dry_run": args.dry_run, "device": dev, "student": args.student,
              "teacher": args.teacher, "img_size": args.img_size, "batch_size": args.batch_size,
              "precision": args.precision, "recipe": args.recipe, "data": data,
              "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
              "kdkit": kdkit_source(),
              "cpu": {"count": os.cpu_count(), "platform": platform.platform()},
              "args": vars(args), "rows": []}
    result["matmul_bf16_tflops"] = matmul_tflops()
    result["flops"] = fl = flops(s)
    log(f"{args.student} forward {fl['student_forward'] / 1e9:.2f} GFLOP/image (train x3 = "
        f"{fl['student_train_per_image'] / 1e9:.2f}), {args.teacher} forward {fl['teacher_forward'] / 1e9:.2f} GFLOP")
    if "cached" in args.modes:
        result["cache"] = write_cache(s)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    teachers: dict = {}
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in compiles:
        for mode in args.modes:
            log(f"{mode}, compile {'on' if compiled else 'off'} ...")
            try:
                row = run_config(s, mode, compiled, teachers)
                add_mfu(row, fl, dev["peak_flops"])
                mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "- (no peak)"
                log(f"  {row['images_per_s']:,.0f} images/s (windows {[round(w) for w in row['windows']]}), "
                    f"first step {row['first_step_s']:.1f} s, MFU {mfu}")
            except Exception as e:  # keep the other configurations' results
                import traceback

                traceback.print_exc()
                row = {"mode": mode, "compile": compiled, "error": f"{type(e).__name__}: {str(e)[:500]}"}
                s.acc.free_memory()
            result["rows"].append(row)
            result["seconds"] = time.perf_counter() - t0
            out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        teachers.pop(compiled, None)
    from rich.console import Console

    Console(stderr=True, width=150).print(table(result))
    print(json.dumps(result, default=str))
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote {out}")
    sys.exit(1 if any("error" in r for r in result["rows"]) else 0)


if __name__ == "__main__":
    main()

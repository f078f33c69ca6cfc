"""kdkit vs. timm's own train.py, end to end, on the quickstart setting.

    python bench/vs_timm.py --timm-train /tmp/timm-src/train.py [--seeds 0 1] [--epochs N]
        [--out runs/bench-vs-timm] [--json-out bench/results/vs_timm.json]
        [--kdkit-extra "[LABEL:]key=value [key=value ...]"] [--timm-extra "[LABEL:]--flag [value ...]"]

Both tools train the same student (DeiT-Ti layout shrunk to 4 blocks x 128 dims, 4 heads, patch 8
at 32x32, with a distillation token) from the same bundled ResNet-9 teacher
(kdkit/assets/teachers/resnet9_cifar_s) on the same bundled 3,000-image CIFAR-10 sample, evaluated
on its 2,000 test images: soft token distillation, tau 4, loss = 0.1 * CE(class head, label) +
0.9 * tau^2 * KL(dist head || teacher) (batchmean); AdamW lr 1e-3 (no batch scaling), wd 0.05,
cosine per update, 1 warmup epoch from 1e-6, min lr 1e-5, 15 epochs, batch 64, RandomResizedCrop
scale (0.35, 1) + hflip 0.5, bicubic, no other augmentation, no label smoothing, fp32, 2 loader
workers, evaluation every 5 epochs and at the end. kdkit side: `kdkit distill --recipe quickstart`
(recipes/quickstart.toml). timm side: train.py with the flags of `timm_flags` below.

For each seed the rows run one after the other (kdkit, timm, then the extra rows), each as its own
subprocess; the table gives each subprocess's wall time, the training time each tool measures
(kdkit: summary.json train_seconds, the whole fit loop with its evaluations and checkpoints; timm:
from the first training epoch to the end of train.py's epoch loop, timed by the launcher around
train.py's own functions) and the final top-1 of the fused (class + distillation logits averaged)
head. timm's number is the last row of its summary.csv: timm validates a distilled DeiT in eval mode,
where its forward returns (class + dist) / 2, the same late fusion as kdkit's fused_top1. The class
and distillation heads alone are evaluated afterwards (not timed) from timm's last.pth.tar.
Speed ratios are kdkit speed / timm speed = timm seconds / kdkit seconds (> 1: kdkit is faster).

Getting timm's train.py (not part of this repository; keep it outside it). Use the train.py of the
timm version installed (`python -c "import timm; print(timm.__version__)"`), e.g. for 1.0.31:

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-repo
    mkdir -p /tmp/timm-src && git -C /tmp/timm-repo show v1.0.31:train.py > /tmp/timm-src/train.py

Only train.py is needed (it imports the installed timm package). A file COMMIT next to it (the
commit's hash), or a git checkout around it, is recorded in the JSON with train.py's sha256.

timm's train.py runs through a small launcher (LAUNCHER below, `python -c`) that imports
kdkit.models first, so `resnet9_cifar_s` is a timm model, and the teacher is passed as
`--kd-model-name local-dir:kdkit/assets/teachers/resnet9_cifar_s`: timm's own loader for a folder
with config.json + model.safetensors (architecture, pretrained weights, CIFAR mean/std). Before the
timed runs the launcher builds train.py's distillation task once and evaluates that teacher on the
test split through timm's loader (it must be ~80 %+, not 10 %); every timed run also checks that
timm's teacher holds exactly the bundled weights.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "kdkit" / "assets" / "teachers" / "resnet9_cifar_s"
DATA = ROOT / "kdkit" / "assets" / "cifar10_sample"
MARK = "KDKIT_BENCH_RESULT "

# The quickstart setting (recipes/quickstart.toml plus the recipe defaults it relies on). Checked
# against kdkit's resolved recipe at start-up; a difference is printed and recorded.
SETTING = {
    "model.student": "deit_tiny", "model.img_size": 32, "model.patch_size": 8,
    "model.kwargs": {"depth": 4, "embed_dim": 128, "num_heads": 4}, "model.head": "token",
    "model.teacher": "resnet9_cifar_s", "model.drop_path": 0.0,
    "data.batch_size": 64, "data.eval_batch_size": 500, "data.workers": 2,
    "aug.scale": [0.35, 1.0], "aug.hflip": 0.5, "aug.color_jitter": 0.0, "aug.auto_augment": "",
    "aug.reprob": 0.0, "aug.mixup": 0.0, "aug.cutmix": 0.0, "aug.label_smoothing": 0.0,
    "aug.interpolation": "bicubic",
    "loss.kind": "soft", "loss.task_weight": 0.1, "loss.kd_weight": 0.9, "loss.tau": 4.0,
    "loss.kl_reduction": "batchmean",
    "optim.opt": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05,
    "optim.epochs": 15, "optim.sched": "cosine", "optim.warmup_epochs": 1, "optim.warmup_lr": 1e-6,
    "optim.min_lr": 1e-5, "optim.clip_grad": 0.0, "optim.ema_decay": 0.0, "optim.layer_decay": 0.0,
    "run.eval_every": 5, "run.compile": False,
}

# Runs timm's train.py (argv[1]) with argv[2:] after registering kdkit's models with timm. It times
# train.py's own epoch loop, checks that the distillation teacher holds the bundled weights and, with
# KDKIT_BENCH_TEACHER_CHECK set, evaluates that teacher on the validation split and stops.
LAUNCHER = r'''
import importlib.util, json, os, sys, time
import kdkit.models  # noqa: F401  registers resnet9_cifar_s (and kdkit's other models) with timm
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
spec = importlib.util.spec_from_file_location("timm_train", path)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
import torch
from safetensors.torch import load_file
info = {"train_epoch_seconds": [], "validate_seconds": [], "first_epoch_start": None}
check = os.environ.get("KDKIT_BENCH_TEACHER_CHECK")

def _emit():
    print("KDKIT_BENCH_RESULT " + json.dumps(info), flush=True)

class Task(train.TokenDistillationTask):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        sd = self.teacher.model.state_dict()
        ref = load_file(os.environ["KDKIT_BENCH_TEACHER_FILE"])
        info["teacher_class"] = type(self.teacher.model).__name__
        info["teacher_mean"] = [round(float(x), 4) for x in self.teacher.mean_kd.flatten()]
        info["teacher_weights_match"] = set(sd) == set(ref) and all(
            torch.equal(sd[n].cpu(), ref[n].to(sd[n].dtype)) for n in ref)
        if check:
            from timm.data import create_dataset, create_loader
            root, split = check.split(os.pathsep)
            ds = create_dataset("", root=root, split=split, is_training=False)
            loader = create_loader(ds, input_size=(3, 32, 32), batch_size=500, is_training=False,
                                   interpolation="bicubic", crop_pct=1.0, mean=tuple(self.student_mean.flatten().tolist()),
                                   std=tuple(self.student_std.flatten().tolist()), num_workers=2, device=self.device)
            correct = n = 0
            self.teacher.eval()
            with torch.no_grad():
                for x, y in loader:  # student-normalised batches, bridged as train.py's task does
                    logits = self.teacher(self.teacher.normalize_input(x, self.student_mean, self.student_std))
                    correct += (logits.argmax(-1) == y).sum().item()
                    n += y.numel()
            info.update(teacher_top1=100.0 * correct / n, teacher_eval_images=n)
            _emit()
            sys.exit(0)

train.TokenDistillationTask = Task
_train_one_epoch, _validate = train.train_one_epoch, train.validate

def train_one_epoch(*a, **k):
    t = time.perf_counter()
    if info["first_epoch_start"] is None:
        info["first_epoch_start"] = t
    try:
        return _train_one_epoch(*a, **k)
    finally:
        info["train_epoch_seconds"].append(time.perf_counter() - t)

def validate(*a, **k):
    t = time.perf_counter()
    try:
        return _validate(*a, **k)
    finally:
        info["validate_seconds"].append(time.perf_counter() - t)

train.train_one_epoch, train.validate = train_one_epoch, validate
train.main()
end = time.perf_counter()
if info["first_epoch_start"] is not None:
    info["train_seconds"] = end - info.pop("first_epoch_start")
_emit()
'''


def timm_flags(data: Path, out: Path, name: str, seed: int, epochs: int, device: str) -> list[str]:
    """train.py flags for the quickstart setting (see the module docstring)."""
    s = SETTING
    kw = {"img_size": s["model.img_size"], "patch_size": s["model.patch_size"], **s["model.kwargs"]}
    return [
        "--data-dir", str(data), "--train-split", "train", "--val-split", "test", "--num-classes", "10",
        # kdkit's deit_tiny is timm's deit_tiny_distilled_patch16_224 (the token distillation task
        # needs its set_distilled_training); train.py passes --img-size to the data config only, so
        # the model's img_size goes in --model-kwargs too.
        "--model", "deit_tiny_distilled_patch16_224",
        "--model-kwargs", *(f"{k}={v}" for k, v in kw.items()),
        "--img-size", str(s["model.img_size"]), "--crop-pct", "1.0",  # kdkit evaluates tiny images whole
        "--interpolation", "bicubic", "--train-interpolation", s["aug.interpolation"],
        "--scale", *map(str, s["aug.scale"]), "--hflip", str(s["aug.hflip"]), "--vflip", "0",
        "--color-jitter", "0", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--smoothing", "0",
        "--kd-model-name", f"local-dir:{TEACHER}", "--kd-distill-type", "token",
        "--kd-token-distill-type", s["loss.kind"], "--kd-temperature", str(s["loss.tau"]),
        "--task-loss-weight", str(s["loss.task_weight"]), "--distill-loss-weight", str(s["loss.kd_weight"]),
        "--opt", s["optim.opt"], "--lr", str(s["optim.lr"]), "--weight-decay", str(s["optim.weight_decay"]),
        "--sched", s["optim.sched"], "--sched-on-updates", "--epochs", str(epochs),
        "--warmup-epochs", str(s["optim.warmup_epochs"]), "--warmup-lr", str(s["optim.warmup_lr"]),
        "--min-lr", str(s["optim.min_lr"]), "--cooldown-epochs", "0",
        "-b", str(s["data.batch_size"]), "-vb", str(s["data.eval_batch_size"]), "-j", str(s["data.workers"]),
        "--val-interval", str(s["run.eval_every"]), "--eval-metric", "top1", "--checkpoint-hist", "1",
        "--log-interval", "20", "--seed", str(seed), "--device", device,
        "--output", str(out), "--experiment", name,
    ]


def kdkit_command(out: Path, name: str, seed: int, epochs: int | None, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "kdkit", "distill", "--recipe", "quickstart", "--teacher-weights", str(TEACHER),
           "--seed", str(seed), "--output", str(out), "--name", name, "--no-progress"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def parse_extra(text: str, default_label: str) -> tuple[str, list[str]]:
    """'[LABEL:]item item ...' -> (label, items); a prefix before ':' is a label when it has no '=' and
    does not start with '-'."""
    head, sep, rest = text.partition(":")
    if sep and "=" not in head and not head.strip().startswith("-") and head.strip():
        return head.strip(), shlex.split(rest)
    items = shlex.split(text)
    return f"{default_label} {' '.join(items)}", items


def shown(cmd: list[str]) -> str:
    """The command as a shell line, the launcher's code shown as <LAUNCHER>."""
    return shlex.join(["<LAUNCHER>" if c == LAUNCHER else c for c in cmd])


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write("$ " + shown(cmd) + "\n")
        f.flush()
        start = time.perf_counter()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
        return rc, time.perf_counter() - start


def launcher_result(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {}


def timm_env() -> dict:
    env = dict(os.environ, KDKIT_BENCH_TEACHER_FILE=str(TEACHER / "model.safetensors"), PYTHONUNBUFFERED="1")
    env.pop("KDKIT_BENCH_TEACHER_CHECK", None)
    return env


def run_kdkit(label: str, out: Path, seed: int, epochs: int | None, overrides: list[str]) -> dict:
    name = f"{slug(label)}-s{seed}"
    cmd = kdkit_command(out, name, seed, epochs, overrides)
    rc, wall = run_logged(cmd, out / f"{name}.log")
    row = {"tool": "kdkit", "label": label, "seed": seed, "rc": rc, "wall_seconds": wall, "overrides": overrides,
           "command": shlex.join(cmd), "log": str(out / f"{name}.log"), "run_dir": str(out / name)}
    summary = out / name / "summary.json"
    if rc == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        ev = s["eval"]
        row.update(train_seconds=s.get("train_seconds"), fused_top1=ev.get("fused_top1"),
                   class_top1=ev.get("class_top1"), dist_top1=ev.get("dist_top1"), eval_images=ev.get("n"),
                   updates=s.get("updates"), precision=s.get("precision"), teacher_check=s.get("teacher_check"))
    return row


def run_timm(label: str, train_py: Path, out: Path, seed: int, epochs: int, device: str, extra: list[str]) -> dict:
    name = f"{slug(label)}-s{seed}"
    cmd = [sys.executable, "-c", LAUNCHER, str(train_py), *timm_flags(DATA, out, name, seed, epochs, device), *extra]
    log = out / f"{name}.log"
    shutil.rmtree(out / name, ignore_errors=True)  # train.py appends to an earlier run's summary.csv
    rc, wall = run_logged(cmd, log, timm_env())
    info = launcher_result(log)
    row = {"tool": "timm", "label": label, "seed": seed, "rc": rc, "wall_seconds": wall, "extra_flags": extra,
           "command": shown(cmd), "log": str(log),
           "run_dir": str(out / name), "train_seconds": info.get("train_seconds"),
           "train_epoch_seconds": info.get("train_epoch_seconds"), "validate_seconds": info.get("validate_seconds"),
           "teacher_weights_match": info.get("teacher_weights_match")}
    rows = read_summary_csv(out / name / "summary.csv")
    if rows:
        last = rows[-1]
        row.update(fused_top1=float(last["eval_top1"]), fused_top1_source="summary.csv eval_top1 (last row)",
                   summary_epochs=[int(r["epoch"]) for r in rows])
    if rc == 0 and (out / name / "last.pth.tar").is_file():
        try:
            row.update(eval_timm_heads(out / name / "last.pth.tar", device))
        except Exception as e:  # the heads are extra information; the fused top-1 above stands
            row["heads_error"] = f"{type(e).__name__}: {e}"
    return row


def read_summary_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("eval_top1")]


def timm_student():
    import timm

    s = SETTING
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=s["model.img_size"],
                             patch_size=s["model.patch_size"], **s["model.kwargs"])


def eval_timm_heads(checkpoint: Path, device: str) -> dict:
    """Class, distillation and fused top-1 of timm's saved student on the test split, through timm's
    eval loader with train.py's settings (not timed)."""
    import torch
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import load_checkpoint

    model = timm_student()
    load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    model.to(device).eval()
    cfg = resolve_data_config({"img_size": 32, "crop_pct": 1.0, "interpolation": "bicubic"}, model=model)
    ds = create_dataset("", root=str(DATA), split="test", is_training=False)
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=500, is_training=False,
                           interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], mean=cfg["mean"],
                           std=cfg["std"], num_workers=2, device=torch.device(device))
    hits = {"class": 0, "dist": 0, "fused": 0}
    n = 0
    with torch.no_grad():
        for x, y in loader:
            feats = model.forward_features(x)
            c, d = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
            for head, logits in (("class", c), ("dist", d), ("fused", (c + d) / 2)):
                hits[head] += (logits.argmax(-1) == y).sum().item()
            n += y.numel()
    return {"class_top1": 100.0 * hits["class"] / n, "dist_top1": 100.0 * hits["dist"] / n,
            "fused_top1_recomputed": 100.0 * hits["fused"] / n, "eval_images": n}


def check_timm_teacher(train_py: Path, out: Path, device: str) -> dict:
    """Build train.py's distillation task once and evaluate its teacher on the test split (not timed)."""
    cmd = [sys.executable, "-c", LAUNCHER, str(train_py), *timm_flags(DATA, out, "teacher-check", 0, 1, device)]
    env = dict(timm_env(), KDKIT_BENCH_TEACHER_CHECK=f"{DATA}{os.pathsep}test")
    rc, wall = run_logged(cmd, out / "teacher-check.log", env)
    return {"rc": rc, "seconds": wall, **launcher_result(out / "teacher-check.log")}


def slug(label: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label.lower())
    return "-".join(filter(None, keep.split("-")))[:60]


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {"cpu_model": model or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "platform": platform.platform(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("kdkit", "timm", "torch", "torchvision", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def train_py_info(path: Path) -> dict:
    info = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    commit_file = path.parent / "COMMIT"
    if commit_file.is_file():
        info["commit"] = commit_file.read_text().strip()
    else:
        r = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
    return info


def recipe_differences() -> list[str]:
    """SETTING keys whose value differs in kdkit's resolved quickstart recipe."""
    try:
        import dataclasses

        from kdkit.config import load_recipe

        r = dataclasses.asdict(load_recipe("quickstart", {}))
    except Exception as e:
        return [f"could not load the quickstart recipe: {type(e).__name__}: {e}"]
    diffs = []
    for key, want in SETTING.items():
        section, field = key.split(".", 1)
        got = r.get(section, {}).get(field, "<missing>")
        got = list(got) if isinstance(got, tuple) else got
        if got != want:
            diffs.append(f"{key}: recipe {got!r}, bench {want!r}")
    return diffs


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def summarize(rows: list[dict], seeds: list[int]) -> dict:
    """Per seed and overall: kdkit-speed / timm-speed for every row against the plain timm row."""
    out: dict = {"per_seed": {}, "overall": {}}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for seed in seeds:
        base = next((r for r in rows if r["seed"] == seed and r["label"] == "timm"), None)
        if base is None:
            continue
        out["per_seed"][seed] = {
            r["label"]: {"wall": ratio(base["wall_seconds"], r["wall_seconds"]),
                         "train": ratio(base.get("train_seconds"), r.get("train_seconds"))}
            for r in rows if r["seed"] == seed and r is not base}
    for label in labels:
        if label == "timm":
            continue
        for kind, key in (("wall", "wall_seconds"), ("train", "train_seconds")):
            pairs = [(b[key], r[key]) for seed in seeds
                     for b in rows if b["seed"] == seed and b["label"] == "timm" and b.get(key)
                     for r in rows if r["seed"] == seed and r["label"] == label and r.get(key)]
            if not pairs:
                continue
            per = [b / r for b, r in pairs]
            out["overall"].setdefault(label, {})[kind] = {
                "total_ratio": sum(b for b, _ in pairs) / sum(r for _, r in pairs),
                "geomean_ratio": math.exp(statistics.mean(math.log(x) for x in per))}
    for label in labels:
        accs = [r["fused_top1"] for r in rows if r["label"] == label and r.get("fused_top1") is not None]
        walls = [r["wall_seconds"] for r in rows if r["label"] == label]
        out["overall"].setdefault(label, {}).update(
            mean_fused_top1=statistics.mean(accs) if accs else None, mean_wall_seconds=statistics.mean(walls))
    return out


def print_table(rows: list[dict], summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    table = Table(title=title)
    for c in ("seed", "row", "rc", "wall s", "train s", "fused top-1", "class", "dist", "speed vs timm (wall)",
              "speed vs timm (train)"):
        table.add_column(c, justify="left" if c == "row" else "right")
    for r in rows:
        rat = summary["per_seed"].get(r["seed"], {}).get(r["label"], {})
        table.add_row(str(r["seed"]), r["label"], str(r["rc"]), f(r["wall_seconds"]), f(r.get("train_seconds")),
                      f(r.get("fused_top1"), "{:.2f}"), f(r.get("class_top1"), "{:.2f}"),
                      f(r.get("dist_top1"), "{:.2f}"), f(rat.get("wall"), "{:.2f}x"), f(rat.get("train"), "{:.2f}x"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table)
    for label, o in summary["overall"].items():
        if "wall" in o:
            console.print(f"{label}: kdkit speed / timm speed = {o['wall']['total_ratio']:.2f}x wall"
                          + (f", {o['train']['total_ratio']:.2f}x training" if "train" in o else "")
                          + f" (totals over seeds); mean fused top-1 {f(o['mean_fused_top1'], '{:.2f}')}")
        else:
            console.print(f"{label}: mean fused top-1 {f(o['mean_fused_top1'], '{:.2f}')}, "
                          f"mean wall {o['mean_wall_seconds']:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm-train", required=True, type=Path, help="timm's train.py (see above for getting it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 15 epochs (both tools)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-vs-timm",
                   help="folder for the runs and their logs")
    p.add_argument("--json-out", type=Path, default=ROOT / "bench" / "results" / "vs_timm.json")
    p.add_argument("--kdkit-extra", action="append", default=[], metavar="[LABEL:]KEY=VALUE ...",
                   help="an extra kdkit row with these `--set` recipe overrides (repeatable)")
    p.add_argument("--timm-extra", action="append", default=[], metavar="[LABEL:]FLAGS",
                   help="an extra timm row with these train.py flags appended (repeatable); write "
                   "--timm-extra='--torchcompile' or 'LABEL: --flag', argparse takes a bare '--flag' for an option")
    p.add_argument("--device", default=None, help="timm's --device (default: cuda if available, else cpu; "
                   "kdkit picks the same by itself)")
    p.add_argument("--skip-teacher-check", action="store_true", help="skip the untimed teacher check")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args()

    import torch

    train_py = args.timm_train.resolve()
    if not train_py.is_file():
        p.error(f"--timm-train {train_py}: no such file (see --help for getting timm's train.py)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    epochs = args.epochs if args.epochs is not None else SETTING["optim.epochs"]
    out = args.out.resolve()
    kd_extras = [parse_extra(t, "kdkit") for t in args.kdkit_extra]
    timm_extras = [parse_extra(t, "timm") for t in args.timm_extra]
    labels = ["kdkit", "timm"] + [label for label, _ in kd_extras + timm_extras]
    if len(set(labels)) != len(labels):
        p.error(f"row labels must differ: {labels}")

    if args.dry_run:
        print(shlex.join(kdkit_command(out / "seedS", "kdkit-sS", 0, args.epochs, [])))
        print(shown([sys.executable, "-c", LAUNCHER, str(train_py),
                     *timm_flags(DATA, out / "seedS", "timm-sS", 0, epochs, device)]))
        return 0

    diffs = recipe_differences()
    for d in diffs:
        print(f"WARNING: setting differs from kdkit's quickstart recipe: {d}", file=sys.stderr)

    result: dict = {"machine": machine_info(), "versions": versions(), "timm_train": train_py_info(train_py),
                    "device": device, "epochs": epochs, "seeds": args.seeds, "setting": SETTING,
                    "recipe_differences": diffs, "timm_flags": timm_flags(DATA, out / "seedS", "timm-sS", 0, epochs,
                                                                          device),
                    "fused_top1_definitions": {
                        "kdkit": "RUN/summary.json eval.fused_top1: argmax of (class + dist logits) / 2",
                        "timm": "summary.csv eval_top1 of the last epoch: train.py validates the distilled DeiT "
                                "in eval mode, whose forward returns (class + dist logits) / 2"}}
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_teacher_check:
        tc = check_timm_teacher(train_py, out, device)
        result["timm_teacher_check"] = tc
        print(f"timm's KD teacher: {tc.get('teacher_class')} top-1 {tc.get('teacher_top1')} on "
              f"{tc.get('teacher_eval_images')} test images, weights match the bundled file: "
              f"{tc.get('teacher_weights_match')} ({tc['seconds']:.0f} s)", flush=True)
        if tc["rc"] != 0 or not tc.get("teacher_weights_match") or (tc.get("teacher_top1") or 0) < 50:
            print(f"ERROR: timm's teacher is not the trained one; see {out / 'teacher-check.log'}", file=sys.stderr)
            return 1

    rows: list[dict] = []
    for seed in args.seeds:
        sdir = out / f"seed{seed}"
        plan = [("kdkit", lambda s=seed, d=sdir: run_kdkit("kdkit", d, s, args.epochs, [])),
                ("timm", lambda s=seed, d=sdir: run_timm("timm", train_py, d, s, epochs, device, []))]
        plan += [(label, lambda s=seed, d=sdir, la=label, it=items: run_kdkit(la, d, s, args.epochs, it))
                 for label, items in kd_extras]
        plan += [(label, lambda s=seed, d=sdir, la=label, it=items: run_timm(la, train_py, d, s, epochs, device, it))
                 for label, items in timm_extras]
        for label, job in plan:
            print(f"seed {seed}: {label} ...", flush=True)
            load = os.getloadavg() if hasattr(os, "getloadavg") else None
            row = job()
            row["loadavg_before"] = list(load) if load else None
            rows.append(row)
            print(f"seed {seed}: {label}: rc {row['rc']}, {row['wall_seconds']:.1f} s wall, "
                  f"train {row.get('train_seconds') or 0:.1f} s, fused top-1 {row.get('fused_top1')}"
                  + ("" if row["rc"] == 0 else f" (see {row['log']})"), flush=True)

    summary = summarize(rows, args.seeds)
    result.update(rows=rows, ratios=summary)
    print_table(rows, summary, f"kdkit vs timm train.py: quickstart distillation, {epochs} epochs, "
                               f"{result['machine']['cpu_model']} ({result['machine']['cpus_usable']} CPUs)")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

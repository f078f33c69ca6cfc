"""Helpers shared by the test modules (constants, argument lists, reference formulas, small
models and datasets). Fixtures live in conftest.py; no test module imports another."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kdkit.cache import build_manifest
from kdkit.cache.writer import write_cache

TINY_DEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY_SWIN = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def steps(run_dir: Path) -> dict[tuple[int, int], dict]:
    """Per-step records of metrics.jsonl by (epoch, step), without the timing."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("images_per_s", None)
        if "eval" in rec:
            rec["eval"].pop("images_per_s")
        out[(rec["epoch"], rec.get("step", "eval"))] = rec
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = steps(run_dir), steps(reference)
    assert list(got) == list(want)  # every step once, in order: nothing repeated, nothing missing
    for key in want:
        assert got[key] == want[key], key
    for folder in ("student", "student_ema"):
        a, b = load_file(run_dir / folder / "model.safetensors"), load_file(reference / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def run_cli(*argv: str) -> int:
    from kdkit.cli import main

    return main([str(a) for a in argv])


TINY_VIT_ARGS = ["--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8"]
TINY_RESNET_ARGS = ["--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}", "--img-size", "32"]
ONE_EPOCH = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--seed", "0",
             "--set", "optim.warmup_epochs=0"]


class TinyConvNet(nn.Module):
    """A user's own classifier: no timm, just forward."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def cli_error(capsys, *argv):
    capsys.readouterr()
    code = run_cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kdkit ")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1] and ": error: " in errors[0], err
    return errors[0]


AUG = ["aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.25", "aug.mixup=0.8", "aug.cutmix=1.0",
       "aug.label_smoothing=0.1"]
STUDENT = ["--student", "deit_tiny", "--img-size", "32", "--patch-size", "8", "--set", "model.kwargs.depth=2",
           "--set", "model.kwargs.embed_dim=32", "--set", "model.kwargs.num_heads=2"]


def common(data: Path, epochs: int = 8, seed: int = 3) -> list[str]:
    args = [*STUDENT, "--data", data, "--batch-size", "16", "--epochs", str(epochs), "--workers", "0",
            "--seed", str(seed), "--no-progress", "--set", "run.log_every=1", "--set", "run.eval_every=100",
            "--set", "optim.warmup_epochs=1", "--set", "optim.lr=1e-3", "--preset", "none"]
    for item in AUG:
        args += ["--set", item]
    return args


def teacher_args(teacher_dir: Path) -> list[str]:
    return ["--teacher", "resnet10t", "--teacher-weights", teacher_dir]


def step_terms(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def distill(tmp: Path, name: str, *args) -> list[dict]:
    assert run_cli("distill", *args, "--output", tmp / "runs", "--name", name) == 0
    return step_terms(tmp / "runs" / name)


def parse_value(v: str):
    try:
        return float(v)
    except ValueError:
        return v


class IdImages:
    """A dataset whose views' pixels carry (view id, epoch), so that the id_teacher below, made of
    elementwise operations, gives outputs the test computes from (view id, epoch) alone."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, view: int) -> dict:
        image = torch.zeros(3, 2, 2)
        image[0, 0, 0], image[1, 0, 0] = view, self.epoch
        return {"image": image, "target": 0, "index": view, "epoch": self.epoch}


def logits_of(view: torch.Tensor, epoch: torch.Tensor) -> torch.Tensor:
    """(n,) view ids, (n,) epochs (float) -> (n, 10) logits."""
    k = torch.arange(10, dtype=torch.float32)
    return torch.sin(view[:, None] * 0.37 + k * 1.3 + epoch[:, None] * 0.11) * 4


def id_teacher(images: torch.Tensor) -> torch.Tensor:
    return logits_of(images[:, 0, 0, 0], images[:, 1, 0, 0])


def write_id_cache(root: Path, n: int = 70, epochs: int = 2, repeats: int = 1, topk: int = 0, dtype: str = "float32",
          mode: str = "replay", shard_size: int = 32) -> Path:
    data = {"source": "ids", "split": "train", "num_samples": n, "classes": [f"c{i}" for i in range(10)],
            "fingerprint": "-"}
    manifest = build_manifest(mode=mode, teacher={"name": "sin", "weights_sha256": "-"}, data=data,
                              views={"repeated_aug": repeats}, seed=5, epochs=epochs, topk=topk, dtype=dtype,
                              shard_size=shard_size)
    write_cache(id_teacher, IdImages(n), root, manifest, batch_size=16, workers=0, progress=False)
    return root


def rows(x):
    return x.double().tolist()


def softmax_py(z, tau=1.0):
    m = max(z)
    e = [math.exp((v - m) / tau) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl_py(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def dkd_py(s, t, y, alpha, beta, tau):
    """The paper's definitions with probabilities and divisions, one sample at a time: per-sample
    (tckd, nckd), each times tau^2."""
    out = []
    for zs, zt, gt in zip(rows(s), rows(t), y.tolist(), strict=True):
        ps, pt = softmax_py(zs, tau), softmax_py(zt, tau)
        others = [j for j in range(len(zs)) if j != gt]
        bs = [ps[gt], sum(ps[j] for j in others)]  # 1 - p_gt as a sum: exact where p_gt is near 1
        bt = [pt[gt], sum(pt[j] for j in others)]
        hat_s = [ps[j] / bs[1] for j in others]
        hat_t = [pt[j] / bt[1] for j in others]
        out.append((tau * tau * kl_py(bt, bs), tau * tau * kl_py(hat_t, hat_s)))
    tckd = [a for a, _ in out]
    nckd = [b for _, b in out]
    return torch.tensor([alpha * a + beta * b for a, b in out], dtype=torch.float64), tckd, nckd


def pearson_py(a, b, eps):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + eps)


def dist_py(s, t, tau, eps=1e-8):
    """(per-sample inter terms, inter, intra), without tau^2."""
    ys = [softmax_py(z, tau) for z in rows(s)]
    yt = [softmax_py(z, tau) for z in rows(t)]
    per_sample = [1 - pearson_py(a, b, eps) for a, b in zip(ys, yt, strict=True)]
    k = len(ys[0])
    cols = [1 - pearson_py([r[j] for r in ys], [r[j] for r in yt], eps) for j in range(k)]
    return per_sample, sum(per_sample) / len(per_sample), sum(cols) / k


def z_score_py(x, eps=1e-7):
    out = []
    for z in rows(x):
        m, sd = statistics.mean(z), statistics.stdev(z)  # stdev: divisor K - 1
        out.append([(v - m) / (sd + eps) for v in z])
    return torch.tensor(out, dtype=torch.float64)


TOKEN_STUDENT = ["--student", "deit_tiny_patch16_224", "--head", "token", "--set",
           "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8"]
FAST = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--preset", "none",
        "--set", "optim.warmup_epochs=0", "--set", "run.log_every=1"]


def semi_args(data: Path, unlabeled: Path, epochs: int = 2, *extra: str) -> list:
    """Flags `kdkit cache` takes as well as `kdkit distill`."""
    return [*STUDENT, "--data", data, "--unlabeled", unlabeled, "--batch-size", "16", "--epochs", str(epochs),
            "--workers", "0", "--seed", "3", "--no-progress", "--set", "run.log_every=1", "--set",
            "run.eval_every=100", "--set", "optim.warmup_epochs=0", "--set", "optim.lr=1e-3", *extra]


# --multi_gpu is Accelerate's multi-process launcher (torchrun); without a GPU each process runs
# on CPU and the processes talk over gloo
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdkit"]
SINGLE = [sys.executable, "-m", "kdkit"]


def run_kdkit(processes: int, *args) -> subprocess.CompletedProcess:
    cmd = [*(LAUNCH if processes == 2 else SINGLE), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_args(data: Path, teacher: Path) -> list:
    # Mixup/CutMix, random erasing and the repeated-augmentation sampler all on; no dropout or
    # drop-path, whose random draws are per process
    return [*STUDENT, "--data", data, "--batch-size", "16", "--epochs", "2", "--workers", "0", "--seed", "5",
            "--no-progress", "--set", "run.log_every=1", "--set", "optim.warmup_epochs=1", "--set", "optim.lr=1e-3",
            "--set", "aug.mixup=0.8", "--set", "aug.cutmix=1.0", "--set", "aug.reprob=0.25",
            "--set", "aug.repeated_aug=3", "--teacher", "resnet10t", "--teacher-weights", teacher, "--preset", "none"]


STEPS_PER_EPOCH, EPOCHS = 7, 2  # test_resume's run: 120 training images, batch 16


def distill_args(teacher: Path, data: Path, run_dir: Path) -> list[str]:
    """A run that uses every piece of state: drop_path and Mixup draw random numbers, EMA, AdamW,
    a cosine schedule, a checkpoint every 2 updates, a metrics line every step."""
    return ["distill", "--teacher", "resnet10t", "--teacher-weights", teacher, "--student", "deit_tiny",
            "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}", "--img-size", "32", "--patch-size", "8",
            "--data", data, "--output", run_dir.parent, "--name", run_dir.name, "--loss", "soft", "--tau", "2",
            "--epochs", str(EPOCHS), "--batch-size", "16", "--lr", "1e-3", "--workers", "0", "--no-progress",
            "--set", "optim.warmup_epochs=1", "--set", "model.drop_path=0.1",
            "--set", "aug.mixup=0.8", "--set", "optim.ema_decay=0.9", "--set", "run.checkpoint_every=2",
            "--set", "run.keep_checkpoints=3", "--set", "run.log_every=1", "--set", "run.teacher_check_batches=1"]


RUN = dict(head="shared", loss="soft", tau=2.0, epochs=1, img_size=32, batch_size=16, workers=0, warmup_epochs=0,
           lr=5e-4, progress=False)  # 120 training images: 7 steps


class NaNTeacher(nn.Module):
    """A fixed random teacher whose answer to training batch number `bad` (0-based) is NaN."""

    def __init__(self, bad: int):
        super().__init__()
        self.net, self.bad, self.batches = TinyConvNet(), bad, 0

    def forward(self, x):
        out = self.net(x)
        if x.shape[0] == RUN["batch_size"]:  # training batches; evaluation batches hold 60 images
            self.batches += 1
            if self.batches == self.bad + 1:
                out = out * float("nan")
        return out


def teacher_like(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """(n, c) logits shaped like a trained classifier's: a Gaussian bulk, a few related classes
    raised, one clear winner."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 1.5
    related = torch.randint(c, (n, 6), generator=g)
    z.scatter_add_(1, related, torch.empty(n, 6).exponential_(0.4, generator=g))
    z[torch.arange(n), torch.randint(c, (n,), generator=g)] += 8.0
    return z

"""timm's train.py and DeiT's main.py flags that need more than a recipe key: the conversions and
implications of kdkit.cli.common's Flag tables, and the flags kdkit refuses in one line, with its
way of doing what they do. Imports no torch (timm only when a --teacher-path URL is read)."""

from __future__ import annotations

import argparse
import ast
import functools
from pathlib import Path

from kdkit.registry import KdkitError


def input_size(values: list[int]) -> int:
    """DeiT's --input-size N, or timm's C H W (3 channels, square): the student's image size."""
    if len(values) == 1 or (len(values) == 3 and values[0] == 3 and values[1] == values[2]):
        return values[-1]
    raise KdkitError(f"--input-size takes N (DeiT) or 3 N N (timm's C H W; kdkit reads RGB, square images), got "
                     f"{' '.join(map(str, values))}")


def opt_kwargs(items: list[str]) -> dict:
    """timm's --opt-kwargs k=v ...: each value a Python literal where it reads as one, else a string."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KdkitError(f"--opt-kwargs takes KEY=VALUE items, got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


@functools.cache
def url_weights(url: str) -> str | None:
    """The timm pretrained tag whose weights are downloaded from `url` (DeiT's --teacher-path URLs
    are the origin of timm's .deit_in1k weights), or None."""
    import timm
    from timm.models import get_pretrained_cfg

    return next((n for n in timm.list_pretrained() if (get_pretrained_cfg(n).url or "") == url), None)


def teacher_path(value: object) -> object:
    """DeiT's --teacher-path: a local file as is; a URL of weights timm has (DeiT's regnety_160)
    reads them from timm's hub ("" in model.teacher_weights); any other URL is refused."""
    if not str(value).startswith(("http://", "https://")):
        return value
    if url_weights(str(value)) is None:
        raise KdkitError(f"--teacher-path {value}: kdkit downloads no weights during a run; download the file and "
                         f"give its path (--teacher-path FILE or --teacher-weights FILE)")
    return ""


def teacher_from_url(value: object) -> dict[str, object]:
    name = url_weights(str(value)) if str(value).startswith(("http://", "https://")) else None
    return {"model.teacher": name} if name else {}


def check_teacher_url(value: object, given: dict) -> None:
    """The teacher named beside a --teacher-path URL must be the model those weights are for."""
    tag = teacher_from_url(value).get("model.teacher")
    flag, teacher = given.get("model.teacher", ("", None))
    if tag and teacher is not None and flag != "--teacher-path":
        from kdkit.models import resolve_model_name  # torch: a verb is running anyway

        names = teacher if isinstance(teacher, list) else [teacher]
        if len(names) != 1 or resolve_model_name(names[0]) != tag:
            raise KdkitError(f"--teacher-path {value} holds the weights of timm's {tag}, and {flag} names "
                             f"{teacher}: give {flag} {tag} (or leave it out)")


def output_dir(value: object) -> dict[str, object]:
    """DeiT's --output_dir DIR: the run is written to DIR itself (kdkit's --output PARENT --name NAME)."""
    path = Path(str(value)).expanduser()
    if not path.name:
        raise KdkitError(f"--output_dir {value!r}: name the run's folder (--output_dir runs/my-run)")
    return {"run.output": str(path.parent), "run.name": path.name}


def mixup_mode(mode: object) -> dict[str, object]:
    if mode != "pair":
        raise KdkitError(f"--mixup-mode {mode}: kdkit mixes pairs of views (timm's pair mode: one lambda per pair, "
                         f"both ways), which a logit cache can replay; give --mixup-mode pair or leave it out")
    return {}


def lr_scale(value: object) -> str:
    return "auto" if value == "" else str(value)  # timm's '' = by optimizer


TIMM_KD = {"loss.kind": "soft", "model.head": "shared", "loss.tau": 4.0, "loss.task_weight": 1.0,
           "loss.kd_weight": 1.0, "loss.kl_reduction": "batchmean"}  # timm train.py's logit distillation defaults

# timm's and DeiT's flags that have no kdkit meaning: the line each is answered with
REFUSED: dict[str, tuple[int | str, str]] = {  # flag -> (nargs, message)
    "--eval": (0, "DeiT's evaluation-only run: evaluate with `kdkit eval --weights RUN/student --data DIR` (or --model NAME)"),
    "--unscale-lr": (0, "kdkit's --lr is already absolute (timm's); DeiT's scaled --lr X is "
                        "--lr-base X --lr-base-size 512 --lr-base-scale linear"),
    "--lr-base-batch": ("?", "now --lr-base-size (timm's name), the batch size --lr-base is for; "
                             "--lr is absolute"),
    "--device": ("?", "the device comes from Accelerate: accelerate launch (--cpu), CUDA_VISIBLE_DEVICES"),
    "--dist-eval": (0, "evaluation is always distributed over the processes (each image counted once)"),
    "--world_size": ("?", "the launcher sets the processes: accelerate launch --num_processes N -m kdkit distill ..."),
    "--dist_url": ("?", "the launcher sets the rendezvous: accelerate launch (--main_process_ip/--main_process_port)"),
    "--data-set": ("?", "give the images with --data DIR (ImageFolder train/ val/), "
                        "a save_to_disk folder or hf:NAME"),
    "--use_volta32": (0, "run_with_submitit.py's Slurm flags: submit `accelerate launch -m kdkit distill ...` with "
                         "your scheduler"),
    "--nodes": ("?", "run_with_submitit.py's Slurm flags: launch with accelerate launch --num_machines N"),
    "--ngpus": ("?", "run_with_submitit.py's Slurm flags: launch with accelerate launch --num_processes N"),
}


class Refuse(argparse.Action):
    """A timm or DeiT flag kdkit has no meaning for: refused in one line naming kdkit's way."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.message}")

"""Exporting a saved student: an ONNX file of one head with its preprocessing in the model's
metadata, or a plain-timm folder whose one head is the late fusion (kdkit/models/fused.py).

ONNX metadata_props (every value a JSON string): mean, std, input_size, interpolation, crop_pct,
label_names (the student's pretrained_cfg and classes), head (fused | class | dist; class for a
single-head student), architecture, kdkit_version. The graph has one input `input`, (B, 3, H, W)
normalised images, and one output `logits`, (B, K); B is symbolic (any batch, as timm's ONNX export)
unless exported with a fixed batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kdkit import __version__
from kdkit.console import console
from kdkit.files import atomic_folder, atomic_write, check_new_output
from kdkit.models import load_saved
from kdkit.models.fused import fused_timm_model, needs_kdkit
from kdkit.models.saved import is_two_headed, read_config, student_folder
from kdkit.registry import KdkitError, suggest
from kdkit.types import StudentOut

EXPORT_HEADS = ("fused", "class", "dist")
EXPORT_EXTRA = 'pip install "kdkit[export]"'
MIN_OPSET = 18  # the oldest opset torch's (dynamo) exporter writes


def resolve_head(config: dict, head: str) -> str:
    """The head to export: fused, class or dist for a two-headed student; class for a single head
    (which `fused` and `class` both name)."""
    if head not in EXPORT_HEADS:
        raise KdkitError(f"unknown head {head!r}.{suggest(head, EXPORT_HEADS)} Choices: {', '.join(EXPORT_HEADS)}")
    if is_two_headed(config):
        return head
    if head == "dist":
        kind = config.get("kdkit", {}).get("head", "a plain timm model")
        raise KdkitError(f"this student has one head ({kind}): it has no distillation head to export; "
                         f"drop --head dist")
    return "class"


class OneHead(nn.Module):
    """A saved student whose forward returns one head's logits, (B, K)."""

    def __init__(self, student: nn.Module, head: str):
        super().__init__()
        self.student, self.head = student, head

    def forward(self, x: Tensor) -> Tensor:
        out = self.student(x)
        if not isinstance(out, StudentOut):
            return out
        return {"fused": out.fused, "class": out.logits, "dist": out.dist_logits}[self.head]


def _load(path: str | Path) -> tuple[Path, dict, nn.Module]:
    folder = student_folder(path)
    student, _, _ = load_saved(folder)
    return folder, read_config(folder), student.eval()


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise KdkitError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                         f"{EXPORT_EXTRA}") from None


def onnx_metadata(config: dict, head: str) -> dict[str, str]:
    """The metadata_props of an exported student: its preprocessing, labels and head, as JSON strings."""
    pcfg = config["pretrained_cfg"]
    values = {k: pcfg[k] for k in ("mean", "std", "input_size", "interpolation", "crop_pct")}
    values.update(label_names=config.get("label_names"), head=head, architecture=config["architecture"],
                  kdkit_version=__version__)
    return {k: json.dumps(v) for k, v in values.items()}


def _to_onnx(module: nn.Module, example: Tensor, dynamic_batch: bool, opset: int | None):
    """The ModelProto of `module` from torch's (dynamo) ONNX exporter; opset None: torch's default."""
    if opset is not None and opset < MIN_OPSET:
        raise KdkitError(f"--opset {opset} is older than torch's ONNX exporter writes: use {MIN_OPSET} or newer "
                         f"(onnxruntime reads them since 1.14)")
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    # the exporter prints progress and conversion tracebacks of its own; the error says what failed
    noise = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), None, input_names=["input"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=shapes, verbose=False)
            return program.model_proto
        except Exception as e:
            raise KdkitError(f"torch could not export the student to ONNX (opset {opset or 'default'}): "
                             f"{export_cause(e)}") from None


def export_cause(e: BaseException) -> str:
    """One line for an exporter's exception: the innermost error of its "## Exception summary" (the
    cause, which its message puts after a page of next steps), else its own first 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    summary = text.split("## Exception summary", 1)
    causes = re.findall(r"^<class '(?:[\w.]+\.)?(\w+)'>: (.+)$", summary[1], re.MULTILINE) if len(summary) == 2 else []
    if causes:
        kind, message = causes[0]
        return f"{type(e).__name__}, caused by {kind}: {' '.join(message.split())[:300]}"
    return f"{type(e).__name__}: {' '.join(text.split())[:300]}"


def _default_onnx_path(folder: Path, config: dict, head: str) -> Path:
    suffix = f"-{head}" if is_two_headed(config) and head != "fused" else ""
    return folder.with_name(f"{folder.name}{suffix}.onnx")


def export_onnx(path: str | Path, out: str | Path | None = None, head: str = "fused",
                batch: int | None = None, opset: int | None = None, overwrite: bool = False) -> dict:
    """Write an ONNX file of a run's student (RUN or RUN/student) giving one head's logits.

    head: fused (default; (class + dist) / 2), class or dist; a single-head student has one output.
    out: default RUN/student.onnx (RUN/student-class.onnx, -dist.onnx for the other heads); an
    existing file is refused unless `overwrite`. batch: None (default) = a symbolic batch
    dimension, as timm's ONNX export; N = a fixed batch of N. opset: default torch's.
    Before writing, onnxruntime runs the graph on a random batch against PyTorch. Returns {"path",
    "head", "opset", "dynamic_batch", "max_abs_diff"}.
    """
    _need_onnx()
    import onnx
    import onnxruntime as ort

    folder = student_folder(path)
    config = read_config(folder)
    head = resolve_head(config, head)
    out = Path(out) if out else _default_onnx_path(folder, config, head)
    if out.is_dir():
        raise KdkitError(f"--out {out} is a folder: give the .onnx file to write")
    check_new_output(out, overwrite, "pass --overwrite to replace it, or another --out")
    if batch is not None and batch < 1:
        raise KdkitError(f"--fixed-batch must be >= 1, got {batch}")
    dynamic_batch = batch is None
    _, _, student = _load(folder)
    module = OneHead(student, head).eval()
    size = tuple(config["pretrained_cfg"]["input_size"])
    gen = torch.Generator().manual_seed(0)
    proto = _to_onnx(module, torch.randn(2 if dynamic_batch else batch, *size, generator=gen), dynamic_batch, opset)
    onnx.helper.set_model_props(proto, onnx_metadata(config, head))
    proto.producer_name, proto.doc_string = "kdkit", f"{config['architecture']} student, {head} head"
    got_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and got_opset != opset:
        raise KdkitError(f"torch's exporter could not produce opset {opset} (it gave {got_opset}): use --opset "
                         f"{got_opset} or leave --opset out")
    if proto.ByteSize() >= 2**31:
        raise KdkitError(f"the ONNX graph of {config['architecture']} is over 2 GB, which needs ONNX's external data "
                         f"files: kdkit export writes single files; export safetensors instead")
    data = proto.SerializeToString()
    x = torch.randn(3 if dynamic_batch else batch, *size, generator=gen)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = module(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    diff = (got - want).abs().max().item()
    if not diff <= 1e-3 * max(1.0, want.abs().max().item()):
        raise KdkitError(f"the exported graph's logits differ from PyTorch's by {diff:.3g} (onnxruntime "
                         f"{ort.__version__}): nothing written; try another --opset")
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    console.print(f"ONNX: {config['architecture']} ({head} head, opset {got_opset}, batch "
                  f"{'dynamic' if dynamic_batch else batch}); onnxruntime vs PyTorch on a random batch: largest "
                  f"|difference| {diff:.2g}")
    return {"path": str(out), "head": head, "opset": got_opset, "dynamic_batch": dynamic_batch,
            "max_abs_diff": diff}


TIMM_FILES = ("model.safetensors", "config.json")


def export_timm(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write a plain-timm folder (model.safetensors + config.json) of a run's student, two heads
    collapsed into one fused head (see kdkit/models/fused.py), loadable with
    `timm.create_model("local-dir:OUT", pretrained=True)` alone. out: default RUN/student-timm; an
    earlier export there is replaced only with `overwrite`, any other folder never. Returns {"path", "architecture", "max_abs_diff"}."""
    folder, config, student = _load(path)
    out = Path(out) if out else folder.with_name(f"{folder.name}-timm")
    if out.resolve() == folder.resolve():
        raise KdkitError(f"--out {out} is the student folder itself: choose another folder")
    if out.is_file() or (out.is_dir() and any(p.name not in TIMM_FILES for p in out.iterdir())):
        raise KdkitError(f"--out {out} exists and is not an earlier export (it holds other files): choose "
                         f"another folder")
    check_new_output(out, overwrite, "pass --overwrite to replace this earlier export, or another --out")
    state, cfg, diff = fused_timm_model(student, config)

    def write(tmp: Path) -> None:
        save_file(state, str(Path(tmp) / "model.safetensors"))
        Path(tmp, "config.json").write_text(json.dumps(cfg, indent=2))

    atomic_folder(out, write)  # replaces an earlier export in one rename
    console.print(f"plain timm: {cfg['architecture']} with one fused head; its logits vs the student's fused "
                  f"ones on a random batch: largest |difference| {diff:.2g}")
    if needs_kdkit(cfg["architecture"]):
        console.print(f"[bold yellow]note: {cfg['architecture']} is registered with timm by kdkit: "
                      f"`import kdkit.models` before timm.create_model(\"local-dir:{out}\", pretrained=True)")
    return {"path": str(out), "architecture": cfg["architecture"], "max_abs_diff": diff}

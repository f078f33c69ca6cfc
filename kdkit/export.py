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

from kdkit.console import console
from kdkit.files import atomic_folder, atomic_write, check_new_output
from kdkit.models import load_saved
from kdkit.models.fused import fused_timm_model, needs_kdkit
from kdkit.models.saved import is_two_headed, read_config, student_folder
from kdkit.registry import KdkitError, suggest
from kdkit.types import StudentOut
from kdkit.version import __version__

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


def _to_onnx(module: nn.Module, size: tuple[int, ...], batch: int | None,
             opset: int | None) -> tuple[bytes, int, float, str]:
    """`module` as a checked ONNX graph: (the serialised ModelProto, its opset, the largest |onnxruntime
    - PyTorch| on a random batch, how it was exported). batch None: a symbolic batch dimension;
    opset None: torch's default.

    torch's exporter is tried as it is first. Where it fails, or onnxruntime refuses or miscomputes
    its graph, it is tried again without its graph optimiser (onnxscript's, which can leave a node
    without its input: Gemma 4's ViT), then, on a model with timm's fused attention
    (F.scaled_dot_product_attention, which some of the exporter's decompositions cannot reshape:
    BEiT's), with timm's own switch of each attention layer (`fused_attn`) off: the same attention
    written out (q k^T scaled, softmax, times v), restored afterwards. onnxruntime is compared with
    PyTorch as the student runs by default. The first error is the one reported."""
    if opset is not None and opset < MIN_OPSET:
        raise KdkitError(f"--opset {opset} is older than torch's ONNX exporter writes: use {MIN_OPSET} or newer "
                         f"(onnxruntime reads them since 1.14)")
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2 if batch is None else batch, *size, generator=gen)
    x = torch.randn(3 if batch is None else batch, *size, generator=gen)
    with torch.no_grad():
        want = module(x)
    fused = [m for m in module.modules() if getattr(m, "fused_attn", None) is True]
    ways = [("as is", True, False), ("without the exporter's graph optimiser", False, False)]
    if fused:
        ways += [("with timm's fused attention off", True, True),
                 ("with timm's fused attention off, without the exporter's graph optimiser", False, True)]
    first = None
    for how, optimize, unfused in ways:
        for m in fused:
            m.fused_attn = not unfused
        try:
            return (*_checked_onnx(module, example, x, want, batch is None, opset, optimize), how)
        except KdkitError as e:
            first = first or e
        finally:
            for m in fused:
                m.fused_attn = True
    raise first


def _checked_onnx(module: nn.Module, example: Tensor, x: Tensor, want: Tensor, dynamic_batch: bool,
                  opset: int | None, optimize: bool) -> tuple[bytes, int, float]:
    """Export, then run the graph in onnxruntime on `x` against PyTorch's `want` (see _to_onnx)."""
    import onnxruntime as ort

    proto = _export_program(module, example, dynamic_batch, opset, optimize)
    got_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and got_opset != opset:
        raise KdkitError(f"torch's exporter could not produce opset {opset} (it gave {got_opset}): use --opset "
                         f"{got_opset} or leave --opset out")
    if proto.ByteSize() >= 2**31:
        raise KdkitError("the ONNX graph is over 2 GB, which needs ONNX's external data files: kdkit export "
                         "writes single files; export safetensors instead")
    data = proto.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about kernels it does without are not ours
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    except Exception as e:  # onnxruntime's own errors (an invalid graph, a kernel it lacks)
        raise KdkitError(f"onnxruntime {ort.__version__} cannot run the exported graph (opset {got_opset}): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    diff = (got - want).abs().max().item()
    if not diff <= 1e-3 * max(1.0, want.abs().max().item()):
        raise KdkitError(f"the exported graph's logits differ from PyTorch's by {diff:.3g} (onnxruntime "
                         f"{ort.__version__}): nothing written; try another --opset")
    return data, got_opset, diff


def _export_program(module: nn.Module, example: Tensor, dynamic_batch: bool, opset: int | None, optimize: bool):
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    # the exporter prints progress and conversion tracebacks of its own; the error says what failed
    noise = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (example,), None, input_names=["input"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                        optimize=optimize)
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
    data, got_opset, diff, how = _to_onnx(module, size, batch, opset)
    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, onnx_metadata(config, head))
    proto.producer_name, proto.doc_string = "kdkit", f"{config['architecture']} student, {head} head"
    data = proto.SerializeToString()
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    exported = "" if how == "as is" else f", exported {how}"
    console.print(f"ONNX: {config['architecture']} ({head} head, opset {got_opset}, batch "
                  f"{'dynamic' if dynamic_batch else batch}{exported}); onnxruntime vs PyTorch on a random batch: "
                  f"largest |difference| {diff:.2g}")
    return {"path": str(out), "head": head, "opset": got_opset, "dynamic_batch": dynamic_batch,
            "max_abs_diff": diff, "exported": how}


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

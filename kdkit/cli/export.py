"""kdkit export: a run's student as ONNX (one head, preprocessing in the metadata) or as a plain-timm
folder with the fused head."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  kdkit export runs/deit-ti --format onnx                       # runs/deit-ti/student.onnx, fused head
  kdkit export runs/deit-ti --format onnx --head dist --fixed-batch 1 --out deit-ti-dist.onnx
  kdkit export runs/deit-ti/student --format onnx --opset 20
  kdkit export runs/resnet-dual --format safetensors            # runs/resnet-dual/student-timm/

RUN is a run directory (its student/ is exported) or a student folder. ONNX: one input `input`
(B, 3, H, W), normalised as the metadata's mean/std say, and one output `logits` (B, K); B is any
batch (symbolic, as timm's ONNX export) unless --fixed-batch N. An existing output is replaced only
with --overwrite. metadata_props hold mean, std, input_size, interpolation, crop_pct,
label_names, head, architecture (JSON strings). safetensors: model.safetensors + config.json
in timm's layout, the two heads collapsed into one fused head, for
timm.create_model("local-dir:DIR", pretrained=True) without kdkit.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a run's student as ONNX, or as a plain-timm folder (fused head)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run directory, or a student folder")
    p.add_argument("--format", default="onnx", help="onnx (default) | safetensors")
    p.add_argument("--head", default="fused", help="ONNX: fused (default: (class + dist) / 2) | class | dist; "
                   "a single-head student has one output")
    p.add_argument("--fixed-batch", type=int, metavar="N", help="ONNX: a fixed batch size N (default: a symbolic "
                   "batch dimension, any batch, as timm's ONNX export)")
    p.add_argument("--opset", type=int, help="ONNX opset (18 or newer; default: torch's)")
    p.add_argument("--out", help="file (onnx; default RUN/student.onnx, student-HEAD.onnx for class or dist) "
                   "or folder (safetensors; default RUN/student-timm)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (else refused, naming it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli.report import out
    from kdkit.export import export_onnx, export_timm
    from kdkit.registry import KdkitError, suggest

    formats = ("onnx", "safetensors")
    if args.format not in formats:
        raise KdkitError(f"unknown --format {args.format!r}.{suggest(args.format, formats)} Choices: onnx, "
                         f"safetensors")
    if args.format == "onnx":
        result = export_onnx(args.run, args.out, args.head, args.fixed_batch, args.opset, args.overwrite)
    else:
        if args.head != "fused" or args.fixed_batch is not None or args.opset is not None:
            raise KdkitError("--head, --fixed-batch and --opset are ONNX options: the safetensors folder has "
                             "one fused head (export --format onnx --head class|dist for one of the two)")
        result = export_timm(args.run, args.out, args.overwrite)
    out.print(f"wrote {result['path']}", soft_wrap=True)
    return 0

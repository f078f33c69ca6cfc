"""Every model family timm registers, as a kdkit student: one small model of each, one distillation step
with the automatic head, saved, reloaded in plain timm, exported to ONNX; and every head tried.

    python bench/families.py [--families resnet,pit] [--json-out bench/results/families.json]

A family is a module of timm's registry (`timm.list_modules()`, plus kdkit's own `t2t_vit` and
`cifar`); FAMILIES names the small model each is walked with (its smallest, or a reduced width or
depth through its own constructor's kwargs) and the input size (32 px where the family takes it).
Models with their own distillation head (distilled DeiT, LeViT, PiT, EfficientViM) get a second row.

Per family, on 10 CIFAR-10 images (one per class; the bundled sample) and a fixed random resnet10t
teacher at 32 px:

  heads   each registered head built on the model and one forward + backward taken (ok), or refused
          with a KdkitError; a refusal that names another head ("use head 'dual'") is truthful when
          that head is ok
  distil  `kdkit.distill(..., head="auto")`: one optimizer update (batch 10), the student saved
  reload  the saved folder rebuilt (kdkit.models.load_saved): its fused logits equal the trained
          student's to 1e-5
  timm    `kdkit export --format safetensors`, then `timm.create_model("local-dir:...")`: its logits
          equal the student's fused ones to 1e-5 (relative to their scale)
  onnx    `kdkit export --format onnx` (dynamic batch), run in onnxruntime on 3 images: equal to
          the student's fused logits to 1e-4

Prints a table (one row per family) and the JSON (also written to --json-out). Exit status 1 when a
stage failed for a family not in CANNOT (the families that cannot, with why).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import timm
import timm.models
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, kdkit_source  # noqa: E402

import kdkit  # noqa: E402
from kdkit.data import sample_path  # noqa: E402
from kdkit.export import export_onnx, export_timm  # noqa: E402
from kdkit.models import HEADS, create_student, load_saved  # noqa: E402
from kdkit.registry import KdkitError  # noqa: E402

K = 10
STAGES = ("distil", "reload", "timm", "onnx")


@dataclass(frozen=True)
class Family:
    """The model a family is walked with: a timm name, constructor kwargs that make it small, and
    the input side (32 unless the family needs more; `why` says why)."""

    model: str
    kwargs: dict = field(default_factory=dict)
    img_size: int = 32
    why: str = ""


FAMILIES: dict[str, Family] = {
    "vision_transformer": Family("test_vit"),
    "byobnet": Family("test_byobnet"),
    "beit": Family("beit_base_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "byoanet": Family("lambda_resnet26t", why="its smallest, halonet_h1, needs a multiple of 256 px (8-pixel halo blocks at stride 32)"),
    "metaformer": Family("poolformerv2_s12"),
    "cait": Family("cait_xxs24_224", dict(patch_size=8, embed_dim=32, depth=2, depth_token_only=1, num_heads=2)),
    "coat": Family("coat_tiny"),
    "maxxvit": Family("test_coatnet"),
    "convit": Family("convit_tiny"),
    "convmixer": Family("convmixer_768_32"),
    "convnext": Family("test_convnext"),
    "cpubone": Family("cpubone_nano"),
    "crossvit": Family("crossvit_tiny_240", dict(img_scale=(1.0, 1.0), patch_size=(8, 16)),
                       why="both branches at 32 px: patch sizes 8 and 16 divide it"),
    "cspnet": Family("cs3darknet_focus_s"),
    "csatv2": Family("csatv2", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1)), 64,
                     why="its stride-32 stage has a 2x2 kernel: 64 px is the smallest input"),
    "cspnext": Family("cspnext_tiny"),
    "davit": Family("davit_tiny", dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
    "deepseek_vit": Family("deepseek_vit_412m", dict(embed_dim=32, depth=2, num_heads=2), 42,
                           why="14-pixel patches: 42 px is the multiple of 14 nearest 32 that its 3x3 token merge takes"),
    "deit": Family("deit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "densenet": Family("densenet121"),
    "dla": Family("dla46x_c"),
    "nfnet": Family("test_nfnet"),
    "dpn": Family("dpn48b"),
    "vovnet": Family("ese_vovnet19b_slim_dw"),
    "resnet": Family("test_resnet"),
    "edgenext": Family("edgenext_xx_small"),
    "efficientformer": Family("efficientformer_l1", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_vit=1), 224,
                              why="its attention bias is fixed at 7x7 tokens: 224 px only"),
    "efficientformer_v2": Family("efficientformerv2_s0"),
    "efficientnet": Family("test_efficientnet"),
    "efficientvim": Family("efficientvim_m1"),
    "efficientvit_mit": Family("efficientvit_b0"),
    "efficientvit_msra": Family("efficientvit_m0"),
    "eva": Family("vit_tiny_patch16_dinov3_qkvb"),
    "fasternet": Family("fasternet_t0"),
    "fastvit": Family("fastvit_t8"),
    "mobilenetv3": Family("mobilenetv3_small_050"),
    "focalnet": Family("focalnet_tiny_srf"),
    "gcvit": Family("gcvit_xxtiny"),
    "gemma4_vit": Family("gemma4_vit_167m", dict(embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=64), 48,
                         why="16-pixel patches pooled 3x3: 48 px"),
    "ghostnet": Family("ghostnet_050"),
    "mlp_mixer": Family("gmlp_ti16_224"),
    "hardcorenas": Family("hardcorenas_b"),
    "hgnet": Family("hgnetv2_b0"),
    "hiera": Family("hiera_tiny_224"),
    "hieradet_sam2": Family("sam2_hiera_tiny"),
    "hrnet": Family("hrnet_w18_small"),
    "iformer": Family("iformer_t"),
    "inception_next": Family("inception_next_atto"),
    "inception_resnet_v2": Family("inception_resnet_v2", img_size=75, why="unpadded stride-2 stem and reductions: 75 px at least"),
    "inception_v3": Family("inception_v3", img_size=75, why="unpadded stride-2 stem and reductions: 75 px at least"),
    "inception_v4": Family("inception_v4", img_size=75, why="unpadded stride-2 stem and reductions: 75 px at least"),
    "lcnetv2": Family("lcnetv2_small"),
    "senet": Family("legacy_seresnet18"),
    "xception": Family("legacy_xception"),
    "levit": Family("levit_128s"),
    "lowformer": Family("lowformer_b0"),
    "mambaout": Family("test_mambaout"),
    "mobilenetv5": Family("mobilenetv5_base", dict(num_features=64)),
    "mobilevit": Family("mobilevit_xxs"),
    "mvitv2": Family("mvitv2_tiny"),
    "naflexvit": Family("naflexvit_base_patch16_parfac_gap", dict(embed_dim=32, depth=2, num_heads=2)),
    "nasnet": Family("nasnetalarge"),
    "nest": Family("nest_tiny"),
    "nextvit": Family("nextvit_small"),
    "pit": Family("pit_ti_224", dict(base_dims=(8, 8, 8), depth=(1, 1, 1), heads=(1, 2, 2))),
    "pnasnet": Family("pnasnet5large"),
    "pvt_v2": Family("pvt_v2_b0"),
    "qwen3_vit": Family("qwen3_vit_88m", dict(embed_dim=32, depth=2, num_heads=2)),
    "rdnet": Family("rdnet_tiny"),
    "regnet": Family("regnetx_002"),
    "repghost": Family("repghostnet_050"),
    "repvit": Family("repvit_m1"),
    "res2net": Family("res2next50"),
    "resnest": Family("resnest14d"),
    "cifar": Family("resnet9_cifar_s"),
    "resnetv2": Family("resnetv2_18"),
    "rexnet": Family("rexnet_100"),
    "vision_transformer_sam": Family("samvit_base_patch16_224", dict(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                                                   global_attn_indexes=(1,), window_size=2)),
    "selecsls": Family("selecsls42"),
    "sequencer": Family("sequencer2d_s"),
    "shvit": Family("shvit_s1"),
    "sknet": Family("skresnet18"),
    "starnet": Family("starnet_s050"),
    "swiftformer": Family("swiftformer_xs"),
    "swin_transformer": Family("swin_tiny_patch4_window7_224", dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                                                  window_size=4)),
    "swin_transformer_v2": Family("swinv2_tiny_window8_256"),
    "swin_transformer_v2_cr": Family("swinv2_cr_tiny_224"),
    "t2t_vit": Family("t2t_vit_7", dict(embed_dim=32, depth=2, num_heads=2, token_dim=16)),
    "vision_transformer_relpos": Family("test_vit_relpos"),
    "tiny_vit": Family("tiny_vit_5m_224"),
    "tnt": Family("tnt_s_legacy_patch16_224"),
    "tresnet": Family("tresnet_m", dict(width_factor=0.25)),
    "twins": Family("twins_svt_small"),
    "vgg": Family("vgg11", dict(mlp_ratio=0.01)),
    "visformer": Family("visformer_tiny"),
    "vision_transformer_hybrid": Family("vit_tiny_r_s16_p8_224"),
    "vitamin": Family("vitamin_small_224"),
    "volo": Family("volo_d1_224"),
    "xception_aligned": Family("xception41p"),
    "xcit": Family("xcit_nano_12_p8_224"),
}
# models with timm's own distillation head, walked as a second row of their family
DISTILLED: dict[str, Family] = {
    "deit (distilled)": Family("deit_tiny_distilled_patch16_224", FAMILIES["deit"].kwargs),
    "levit (distilled)": Family("levit_128s", dict(distilled=True)),
    "pit (distilled)": Family("pit_ti_distilled_224", FAMILIES["pit"].kwargs),
    "efficientvim (distilled)": Family("efficientvim_m1_dist"),
}
# families that cannot be a student (or cannot pass a stage), and why
CANNOT: dict[str, str] = {}


def registered_families() -> list[str]:
    """Every module of timm's model registry (kdkit's own included once kdkit.models is imported)."""
    import kdkit.models  # noqa: F401  (registers t2t_vit and cifar)

    return sorted({timm.models.model_entrypoint(n).__module__.split(".")[-1] for n in timm.list_models()})


def make_inputs(root: Path) -> tuple[Path, Path]:
    """One training and one test image per class from the bundled sample; a fixed random resnet10t
    teacher as a timm folder whose config says 32x32."""
    data = root / "data"
    for split in ("train", "test"):
        for cls in sorted((sample_path() / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
            first = sorted(cls.iterdir())[0]
            shutil.copy(first, data / split / cls.name / first.name)
    teacher = root / "teacher"
    teacher.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model("resnet10t", num_classes=K)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, teacher / "model.safetensors")
    cfg = {"architecture": "resnet10t", "num_classes": K,
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": K}}
    (teacher / "config.json").write_text(json.dumps(cfg))
    return data, teacher


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def try_heads(fam: Family) -> dict[str, str]:
    """Each head on the family's model: "ok" (built, one forward + backward), "refused: MESSAGE"
    (KdkitError) or "FAIL: ERROR"."""
    out = {}
    for head in HEADS.names():
        try:
            student = create_student(fam.model, K, head, img_size=fam.img_size, model_kwargs=dict(fam.kwargs))
        except KdkitError as e:
            out[head] = f"refused: {e}"
            continue
        except Exception as e:
            out[head] = f"FAIL: {one_line(e)}"
            continue
        try:
            out_ = student.train()(torch.randn(2, 3, fam.img_size, fam.img_size))
            (out_.logits.float().sum() + out_.dist_logits.float().sum()).backward()
            out[head] = "ok"
        except Exception as e:
            out[head] = f"FAIL: {one_line(e)}"
    return out


def untruthful(heads: dict[str, str]) -> list[str]:
    """Refusals that point to a head that is not ok, and failures."""
    bad = []
    for head, result in heads.items():
        if result.startswith("FAIL"):
            bad.append(f"{head}: {result}")
        for named in re.findall(r"use head '(\w+)'", result) if result.startswith("refused") else ():
            if named != "auto" and heads.get(named) != "ok":
                bad.append(f"{head} points to {named}, which is {heads.get(named, 'unknown')[:60]}")
    return bad


def fused(out) -> torch.Tensor:
    return (out.logits + out.dist_logits) / 2 if hasattr(out, "dist_logits") else out


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """The largest |got - want|; AssertionError past tol relative to the logits' scale."""
    diff = (got.float() - want.float()).abs().max().item()
    if not diff <= tol * max(1.0, want.abs().max().item()):
        raise AssertionError(f"differs by {diff:.3g}")
    return diff


def walk(name: str, fam: Family, data: Path, teacher: Path, work: Path, heads: bool = True) -> dict:
    """One family through every stage; a stage that fails ends the walk (the later ones are "-")."""
    row: dict = {"family": name, "model": fam.model, "kwargs": fam.kwargs, "img_size": fam.img_size,
                 "stages": {}, "seconds": {}}
    start = time.perf_counter()
    torch.manual_seed(0)
    if heads:
        row["heads"] = try_heads(fam)
        row["untruthful"] = untruthful(row["heads"])
    row["seconds"]["heads"] = round(time.perf_counter() - start, 1)
    run = work / re.sub(r"\W+", "_", name)
    images = None
    stage = "distil"
    try:
        t = time.perf_counter()
        noise = io.StringIO()
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            result = kdkit.distill(fam.model, "resnet10t", str(data), teacher_weights=str(teacher), head="auto",
                                    img_size=fam.img_size, kwargs=dict(fam.kwargs), epochs=1, batch_size=K,
                                    eval_batch_size=K, workers=0, progress=False, warmup_epochs=0,
                                    output=str(work), name=run.name, teacher_check_batches=1)
        summary, trained = result.summary, result.model.eval()  # the API's plain module, heads fused
        row["auto_head"] = json.loads((run / "student" / "config.json").read_text())["kdkit"]["head"]
        row["params_m"] = round(sum(p.numel() for p in trained.parameters()) / 1e6, 3)
        if summary["updates"] != 1:
            raise AssertionError(f"{summary['updates']} updates, not 1")
        row["stages"]["distil"] = "ok"
        row["seconds"]["distil"] = round(time.perf_counter() - t, 1)

        stage, t = "reload", time.perf_counter()
        images = torch.randn(3, 3, fam.img_size, fam.img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = fused(trained(images))
            saved, _, _ = load_saved(run / "student")
            row["diff_reload"] = close(fused(saved.eval()(images)), want, 1e-5)
        row["stages"]["reload"] = "ok"
        row["seconds"]["reload"] = round(time.perf_counter() - t, 1)

        stage, t = "timm", time.perf_counter()
        with contextlib.redirect_stdout(noise):
            export_timm(run / "student", run / "student-timm")
        plain = timm.create_model(f"local-dir:{run / 'student-timm'}", pretrained=True).eval()
        with torch.no_grad():
            row["diff_timm"] = close(plain(images), want, 1e-5)
        row["stages"]["timm"] = "ok"
        row["seconds"]["timm"] = round(time.perf_counter() - t, 1)

        stage, t = "onnx", time.perf_counter()
        import onnxruntime as ort

        with contextlib.redirect_stdout(noise):
            path = export_onnx(run / "student", run / "student.onnx")["path"]
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        row["diff_onnx"] = close(torch.from_numpy(sess.run(None, {"input": images.numpy()})[0]), want, 1e-4)
        row["stages"]["onnx"] = "ok"
        row["seconds"]["onnx"] = round(time.perf_counter() - t, 1)
    except Exception as e:
        row["stages"][stage] = f"FAIL: {one_line(e)}"
    for s in STAGES:
        row["stages"].setdefault(s, "-")
    row["seconds"]["total"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(run, ignore_errors=True)
    return row


def mark(result: str) -> str:
    return "ok" if result == "ok" else "-" if result == "-" else "refused" if result.startswith("refused") else "FAIL"


def table(rows: list[dict]) -> Table:
    t = Table(title="timm families as kdkit students (one step, head auto)")
    for c in ("family", "model", "px", "params M", "auto", *HEADS.names(), *STAGES, "s"):
        t.add_column(c)
    for r in rows:
        heads = [mark(r.get("heads", {}).get(h, "-")) for h in HEADS.names()]
        t.add_row(r["family"], r["model"], str(r["img_size"]), str(r.get("params_m", "")), r.get("auto_head", ""),
                  *heads, *(mark(r["stages"][s]) for s in STAGES), str(r["seconds"]["total"]))
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="", help="comma-separated families (default: all, and the distilled rows)")
    p.add_argument("--no-heads", action="store_true", help="skip trying every head")
    p.add_argument("--json-out", default="bench/results/families.json")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    every = {**FAMILIES, **DISTILLED}
    chosen = [f.strip() for f in args.families.split(",") if f.strip()] or list(every)
    unknown = [f for f in chosen if f not in every]
    if unknown:
        raise SystemExit(f"unknown families: {', '.join(unknown)}")
    missing = sorted(set(registered_families()) - set(FAMILIES))
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdkit-families-") as tmp:
        data, teacher = make_inputs(Path(tmp))
        for name in chosen:
            row = walk(name, every[name], data, teacher, Path(tmp) / "runs", heads=not args.no_heads)
            row["cannot"] = CANNOT.get(name, "")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    failed = [r["family"] for r in rows if not r["cannot"] and (any(v != "ok" for v in r["stages"].values())
                                                                or r.get("untruthful"))]
    result = {"command": " ".join(["python", "bench/families.py", *sys.argv[1:]]), "rows": rows,
              "families_registered": len(registered_families()), "not_in_table": missing, "failed": failed,
              "seconds": round(time.perf_counter() - start, 1), "timm": timm.__version__, "torch": torch.__version__,
              "python": platform.python_version(), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "kdkit": kdkit_source()}
    Console(width=200).print(table(rows))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "kdkit")}))
    sys.exit(1 if failed or missing else 0)


if __name__ == "__main__":
    main()

"""--pretrained-path: a timm or DeiT checkpoint of another class count, image size, patch size or token
layout into every student head, checked against timm's own functions applied here independently;
and the Hub route refused offline in one line while timm's local-file overlay works."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from kdkit import KdkitError
from kdkit.models import create_model, create_student
from tests.helpers import TINY_SWIN, run_cli

ARCH = dict(depth=2, embed_dim=32, num_heads=2)  # a 2-layer, 32-wide DeiT
SRC = dict(img_size=32, patch_size=4, **ARCH)  # the checkpoint's: an 8x8 grid, 1000 classes
PLAIN, DISTILLED = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"


def _randomised(name: str) -> dict[str, torch.Tensor]:
    """A 1000-class checkpoint with every tensor random (no zeros or ones that would match anything)."""
    model = timm.create_model(name, **SRC)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(3)
    plain, distilled = _randomised(PLAIN), _randomised(DISTILLED)
    save_file(plain, root / "deit_ti.safetensors")
    torch.save({"model": plain}, root / "deit_ti.pth")  # DeiT's layout
    torch.save({"model": distilled}, root / "deit_ti_distilled.pth")
    return {"safetensors": (root / "deit_ti.safetensors", plain), "pth": (root / "deit_ti.pth", plain),
            "distilled": (root / "deit_ti_distilled.pth", distilled)}


def _student(name, head, path, num_classes=10, img_size=48, patch_size=4, lines=None):
    return create_student(name, num_classes, head, img_size=img_size, patch_size=patch_size, model_kwargs=ARCH,
                          pretrained_path=path, report=(lines if lines is not None else []).append)


def _assert_blocks_loaded(model, sd):
    blocks = [k for k in sd if k.startswith(("blocks.", "norm."))]
    assert len(blocks) == 2 * 12 + 2
    for k in blocks:
        assert torch.equal(model.state_dict()[k], sd[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_plain_checkpoint_into_a_distilled_deit(files, fmt):
    """kdkit's deit_tiny (timm's distilled DeiT, token head) from a plain 1000-class DeiT file at 32 px:
    blocks as in the file, patch positions resampled to 12x12 as timm resamples them, the token and
    its position a copy of the class token's, both heads reset to 10 classes and equal."""
    path, sd = files[fmt]
    lines = []
    student = _student("deit_tiny", "token", path, lines=lines)
    m = student.model
    _assert_blocks_loaded(m, sd)
    assert torch.equal(m.cls_token, sd["cls_token"]) and torch.equal(m.dist_token, sd["cls_token"])
    grid = resample_abs_pos_embed(sd["pos_embed"], new_size=(12, 12), num_prefix_tokens=1)
    assert torch.allclose(m.pos_embed, torch.cat([grid[:, :1], grid[:, :1], grid[:, 1:]], dim=1))
    assert m.head.weight.shape == (10, 32) and torch.equal(m.head_dist.weight, m.head.weight)
    assert torch.equal(m.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    (line,) = lines
    assert f"pretrained weights {path}:" in line and "resampled (pos_embed 1x65x32 -> 1x146x32)" in line
    assert "reset (head.weight, head.bias, head_dist.weight, head_dist.bias: 1000 -> 10 classes)" in line
    assert "dist_token" in line.split("from the class token and head")[1]
    out = student(torch.randn(2, 3, 48, 48))
    assert out.logits.shape == out.dist_logits.shape == (2, 10)
    # the same model under timm's own distillation head (native): the same start
    native = _student("deit_tiny", "native", path).model.state_dict()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in native.items() if not k.startswith("head"))
    assert torch.equal(native["head_dist.weight"], native["head.weight"])


def test_plain_checkpoint_into_every_head_of_a_plain_vit(files):
    """The same file into timm's plain DeiT under each head: the model equals timm's own pretrained
    route (create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))) everywhere but the
    reset head; kdkit's inserted token starts as the class token plus its position (it gets none of
    its own), the added distillation heads as the class head."""
    path, sd = files["pth"]
    reference = timm.create_model(PLAIN, pretrained=True, num_classes=10, img_size=48, patch_size=4,
                                  pretrained_cfg_overlay=dict(file=str(path)), **ARCH).state_dict()
    for head in ("token", "dual", "shared"):
        student = _student(PLAIN, head, path)
        state = student.model.state_dict()
        assert state.keys() == reference.keys()
        for k in state:
            if not k.startswith("head."):
                assert torch.equal(state[k], reference[k]), (head, k)
        assert student.model.head.weight.shape == (10, 32)
        if head == "token":
            assert torch.equal(student.dist_token, sd["cls_token"] + sd["pos_embed"][:, :1])
        if head in ("token", "dual"):
            assert torch.equal(student.head_dist.weight, student.model.head.weight)
            assert torch.equal(student.head_dist.bias, student.model.head.bias)


def test_distilled_checkpoint_keeps_its_token(files):
    """DeiT's distilled file: its own token into a distilled student (positions resampled with both
    prefix tokens kept); into a plain ViT's inserted token, as it entered the blocks (token + its
    position), the position row leaving the grid; a head without a token reports it unused."""
    path, sd = files["distilled"]
    native = _student("deit_tiny", "token", path).model
    _assert_blocks_loaded(native, sd)
    assert torch.equal(native.dist_token, sd["dist_token"])
    assert torch.allclose(native.pos_embed, resample_abs_pos_embed(sd["pos_embed"], (12, 12), num_prefix_tokens=2))

    inserted = _student(PLAIN, "token", path)
    assert torch.equal(inserted.dist_token, sd["dist_token"] + sd["pos_embed"][:, 1:2])
    without = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)
    assert torch.allclose(inserted.model.pos_embed, resample_abs_pos_embed(without, (12, 12), num_prefix_tokens=1))

    lines = []
    _student(PLAIN, "shared", path, lines=lines)
    assert "not used by this head (dist_token, head_dist.weight, head_dist.bias)" in lines[0]


def test_same_class_count_keeps_the_heads_and_patch_size_is_resampled(files):
    """1000 classes into 1000: nothing reset, the distillation head a copy of the file's class head;
    patch 8 instead of 4: the patch embedding resampled as timm's resample_patch_embed does."""
    path, sd = files["safetensors"]
    lines = []
    student = _student(PLAIN, "token", path, num_classes=1000, patch_size=8, lines=lines)
    m = student.model
    assert torch.equal(m.head.weight, sd["head.weight"]) and torch.equal(student.head_dist.weight, sd["head.weight"])
    assert torch.allclose(m.patch_embed.proj.weight, resample_patch_embed(sd["patch_embed.proj.weight"], [8, 8]))
    assert torch.allclose(m.pos_embed, resample_abs_pos_embed(sd["pos_embed"], (6, 6), num_prefix_tokens=1))
    assert "reset" not in lines[0] and "patch_embed.proj.weight 32x3x4x4 -> 32x3x8x8" in lines[0]
    # the saved config is the model's own, not the overlay holding the file's tensors
    assert "state_dict" not in m.pretrained_cfg and m.pretrained_cfg["num_classes"] == 1000


def test_other_architectures(tmp_path):
    """A ConvNet (dual head), Swin at another image size and kdkit's T2T-ViT (learned positions) from
    100-class files: everything but the classifier as timm's own pretrained route loads it (T2T's
    positions as resample_abs_pos_embed gives), the dual head a copy of the reset classifier."""
    torch.manual_seed(4)
    swin_kw = {k: v for k, v in TINY_SWIN.items() if k != "img_size"}
    cases = [("resnet10t", "dual", {}, 32, 32), ("swin_tiny_patch4_window7_224", "dual", swin_kw, 32, 64),
             ("t2t_vit_7", "token", {"learned_pos": True, "depth": 2}, 32, 64)]
    for name, head, kw, src_size, size in cases:
        size_kw = {} if name == "resnet10t" else {"img_size": src_size}
        src = create_model(name, 100, **size_kw, **kw)
        with torch.no_grad():
            for p in src.parameters():
                p.normal_()
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
        lines = []
        student = create_student(name, 10, head, img_size=size if size_kw else None, model_kwargs=kw,
                                 pretrained_path=path, report=lines.append)
        new_size = {} if name == "resnet10t" else {"img_size": size}
        reference = create_model(name, 10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100),
                                 **new_size, **kw).state_dict()
        classifier = student.model.pretrained_cfg["classifier"]
        state = student.model.state_dict()
        for k in state:
            if not k.startswith(classifier + "."):
                assert torch.equal(state[k], reference[k]), (name, k)
        assert "100 -> 10 classes" in lines[0]
        if head == "dual":
            assert torch.equal(student.head_dist.weight, student.model.get_classifier().weight)
        if name == "t2t_vit_7":
            old = src.state_dict()["pos_embed"]
            assert torch.allclose(state["pos_embed"], resample_abs_pos_embed(old, [4, 4], num_prefix_tokens=1))
        assert student.eval()(torch.randn(1, 3, size, size)).logits.shape == (1, 10)


class _Pickled:
    pass


def test_bad_files_are_one_line(files, tmp_path):
    resnet = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), resnet)
    with pytest.raises(KdkitError, match="cannot load .*resnet.safetensors into VisionTransformer"):
        _student(PLAIN, "token", resnet)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": files["pth"][1], "extra": _Pickled()}, pickled)  # code to unpickle: weights_only refuses
    with pytest.raises(KdkitError, match="cannot read weights from .*pickled.pth: .*weights_only=True blocked"):
        _student(PLAIN, "token", pickled)
    # DeiT's resumable checkpoint.pth: its argparse args are data timm's reader allows
    deit_resume = tmp_path / "checkpoint.pth"
    torch.save({"model": files["pth"][1], "args": argparse.Namespace(lr=1e-3), "epoch": 299}, deit_resume)
    assert torch.equal(_student(PLAIN, "token", deit_resume).model.norm.weight, files["pth"][1]["norm.weight"])
    (tmp_path / "empty.pth").touch()
    with pytest.raises(KdkitError, match="empty"):
        _student(PLAIN, "token", tmp_path / "empty.pth")
    with pytest.raises(KdkitError, match="not found"):
        _student(PLAIN, "token", tmp_path / "missing.pth")


def test_initial_checkpoint_stays_strict_and_points_to_pretrained_path(files):
    path, _ = files["pth"]
    with pytest.raises(KdkitError, match="strictly .*--pretrained-path FILE") as e:
        create_student(PLAIN, 10, "token", img_size=32, patch_size=4, model_kwargs=ARCH, weights=path)
    assert "\n" not in str(e.value)
    # a checkpoint of exactly this model loads (timm's --initial-checkpoint), a DeiT .pth included
    student = create_student(PLAIN, 1000, "shared", img_size=32, patch_size=4, model_kwargs=ARCH, weights=path)
    assert torch.equal(student.model.head.weight, files["pth"][1]["head.weight"])


def test_offline_hub_fails_fast_and_timm_file_overlay_works(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(KdkitError, match="HF_HUB_OFFLINE is set: .*--pretrained-path FILE"):
        create_student(PLAIN, 10, "token", pretrained=True, model_kwargs=ARCH)
    assert time.perf_counter() - start < 5
    path, sd = files["pth"]
    model = create_model(PLAIN, 1000, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SRC)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # --pretrained through that overlay: the token kdkit inserts starts as the class token, as with a file
    student = create_student(PLAIN, 10, "token", pretrained=True,
                             model_kwargs=dict(SRC, pretrained_cfg_overlay=dict(file=str(path))))
    assert torch.equal(student.dist_token, sd["cls_token"] + sd["pos_embed"][:, :1])
    assert torch.equal(student.head_dist.weight, student.model.head.weight)


def test_distill_cli_with_pretrained_path(files, tiny_data, teacher_dir, tmp_path, capsys, monkeypatch):
    """Two steps of distillation from the DeiT file, offline, with timm's --pretrained --pretrained-path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = files["pth"]
    assert run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny",
                   "--pretrained", "--pretrained-path", path, "--set", "model.kwargs={depth=2, embed_dim=32, num_heads=2}",
                   "--img-size", "32", "--patch-size", "8", "--data", tiny_data, "--output", tmp_path, "--name", "ft",
                   "--epochs", "1", "--batch-size", "64", "--workers", "0", "--no-progress",
                   "--set", "optim.warmup_epochs=0") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"pretrained weights {path}:" in err and "1000 -> 10 classes" in err
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert "resampled (pos_embed" in summary["pretrained"]
    cfg = json.loads((tmp_path / "ft" / "student" / "config.json").read_text())
    assert cfg["num_classes"] == 10 and "state_dict" not in cfg["pretrained_cfg"]

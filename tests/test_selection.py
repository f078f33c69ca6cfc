"""--init-from: weight selection (Xu et al., ICLR 2024) from a larger model of the student's family.

The larger models are tiny timm models with every tensor random, saved here as a safetensors file, a
weights-only .pth and a kdkit student folder. Each student tensor is checked against the larger
tensor sliced at indices written out below: the authors' rule (`uniform_element_selection` of
OscarXZQ/weight-selection: a step of N / n when n divides N, else round(linspace(0, N - 1, n))),
computed by hand for these sizes."""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from kdkit import KdkitError
from kdkit.models import create_student
from tests.helpers import run_cli

PLAIN = "deit_tiny_patch16_224"
BIG_VIT = dict(depth=4, embed_dim=12, num_heads=2, mlp_ratio=2.0)  # qkv 36 rows, MLP 24 wide
SMALL_VIT = dict(depth=2, embed_dim=8, num_heads=2, mlp_ratio=2.0)  # qkv 24 rows, MLP 16 wide
D = [0, 2, 3, 5, 6, 8, 9, 11]  # 8 of 12: round(linspace(0, 11, 8)) (12 / 8 is no integer step)
QKV = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29, 30, 32, 33, 35]  # 24 of 36
MLP = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]  # 16 of 24
BIG_RESNET = dict(channels=(16, 32, 64, 128), stem_width=16, layers=(2, 2, 2, 2))
SMALL_RESNET = dict(channels=(8, 16, 32, 64), stem_width=8)  # resnet10t: one block a stage
HALF = {n: list(range(0, n, 2)) for n in (6, 12, 16, 32, 64, 128, 256)}  # n/2 of n: every other one, from 0


def _random_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A model's state dict with every tensor random (no ones or zeros that would match anything)."""
    model = timm.create_model(name, **kwargs)
    state = model.state_dict()
    g = torch.Generator().manual_seed(7)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


@pytest.fixture(scope="module")
def larger(tmp_path_factory):
    root = tmp_path_factory.mktemp("larger")
    vit = _random_state(PLAIN, img_size=32, patch_size=8, **BIG_VIT)
    save_file(vit, root / "vit.safetensors")
    vit_fine = _random_state(PLAIN, img_size=32, patch_size=4, **BIG_VIT)  # an 8 x 8 grid of 4 px patches
    save_file(vit_fine, root / "vit_p4.safetensors")
    resnet = _random_state("resnet10t", num_classes=10, **BIG_RESNET)
    folder = root / "run" / "student"  # a kdkit student folder inside a run directory
    folder.mkdir(parents=True)
    save_file(resnet, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 10}))
    torch.save({"model": vit}, root / "vit.pth")  # DeiT's layout, read with weights_only=True
    return {"vit": (root / "vit.safetensors", vit), "vit_p4": (root / "vit_p4.safetensors", vit_fine),
            "resnet": (root / "run", resnet), "pth": (root / "vit.pth", vit)}


def _vit(path, head="token", name="deit_tiny", lines=None, patch_size=8, **kw):
    return create_student(name, 10, head, img_size=32, patch_size=patch_size, model_kwargs=kw.pop("arch", SMALL_VIT),
                          init_from=path, report=(lines if lines is not None else []).append, **kw)


def _assert_block(m, big, mine: int, theirs: int):
    b, p = f"blocks.{mine}.", f"blocks.{theirs}."
    got = m.state_dict()
    assert torch.equal(got[b + "attn.qkv.weight"], big[p + "attn.qkv.weight"][QKV][:, D])
    assert torch.equal(got[b + "attn.qkv.bias"], big[p + "attn.qkv.bias"][QKV])
    assert torch.equal(got[b + "attn.proj.weight"], big[p + "attn.proj.weight"][D][:, D])
    assert torch.equal(got[b + "mlp.fc1.weight"], big[p + "mlp.fc1.weight"][MLP][:, D])
    assert torch.equal(got[b + "mlp.fc2.weight"], big[p + "mlp.fc2.weight"][D][:, MLP])
    for k in ("norm1.weight", "norm1.bias", "norm2.bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias"):
        want = big[p + k][MLP] if k == "mlp.fc1.bias" else big[p + k][D]
        assert torch.equal(got[b + k], want), k


def test_vit_first_layers_and_evenly_spaced_channels(larger):
    """A 2 x 8 distilled DeiT (kdkit's deit_tiny, token head) from a plain 4 x 12 ViT file: blocks 0
    and 1 of 4, channels at the indices above; the distillation token and its position a copy of the
    class token's (the larger has none); the classifiers exactly as without --init-from."""
    path, big = larger["vit"]
    lines = []
    torch.manual_seed(5)
    m = _vit(path, lines=lines).model
    torch.manual_seed(5)
    plain = _vit(None).model  # the same seed without selection: the heads' random init
    _assert_block(m, big, 0, 0)
    _assert_block(m, big, 1, 1)
    assert torch.equal(m.patch_embed.proj.weight, big["patch_embed.proj.weight"][D])
    assert torch.equal(m.patch_embed.proj.bias, big["patch_embed.proj.bias"][D])
    assert torch.equal(m.cls_token, big["cls_token"][..., D]) and torch.equal(m.dist_token, m.cls_token)
    pos = big["pos_embed"]  # (1, 1 + 16, 12): a row for the distillation token inserted after the class token's
    assert torch.equal(m.pos_embed, torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)[..., D])
    assert torch.equal(m.norm.weight, big["norm.weight"][D]) and torch.equal(m.norm.bias, big["norm.bias"][D])
    for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        assert torch.equal(m.state_dict()[k], plain.state_dict()[k]), k
    (line,) = lines
    assert line.startswith(f"weight selection from {path}: 31 tensors selected")
    assert "widths 36 -> 24, 24 -> 16, 12 -> 8" in line and "layers: blocks first 2 of 4" in line
    assert "classifier at its random init (head.weight, head.bias, head_dist.weight, head_dist.bias)" in line


def test_uniform_layers_and_other_grid_and_patch(larger):
    """init_from_layers = "uniform": blocks 0 and 2 of 4. From 4 px patches on an 8 x 8 grid into
    8 px patches on 4 x 4: position and patch embeddings resampled as timm's checkpoint filter does
    (timm's own functions, applied here), then selected; into a plain ViT under kdkit's inserted token."""
    path, big = larger["vit_p4"]
    student = _vit(path, head="token", name=PLAIN, init_from_layers="uniform")
    m = student.model
    _assert_block(m, big, 0, 0)
    _assert_block(m, big, 1, 2)
    pos = resample_abs_pos_embed(big["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    assert torch.allclose(m.pos_embed, pos[..., D])
    assert torch.allclose(m.patch_embed.proj.weight, resample_patch_embed(big["patch_embed.proj.weight"], [8, 8])[D])
    # kdkit's inserted token starts as the selected class token plus its position (as after --pretrained-path)
    assert torch.equal(student.dist_token, m.cls_token + m.pos_embed[:, :1])
    assert torch.equal(student.head_dist.weight, m.head.weight)


def test_resnet_from_a_student_folder(larger):
    """resnet10t 8-wide, one block a stage, from a 16-wide one with two blocks a stage (a kdkit run
    directory): the first block of each stage, every other channel (16 / 8 is an integer step: 0, 2,
    4, ...), batch-norm statistics included; under the dual head, which composes as any head does."""
    run, big = larger["resnet"]
    lines = []
    student = create_student("resnet10t", 10, "dual", img_size=32, model_kwargs=SMALL_RESNET, init_from=run,
                             report=lines.append)
    got = student.model.state_dict()
    assert torch.equal(got["conv1.0.weight"], big["conv1.0.weight"][HALF[12]])  # stem: 6 of 12, RGB kept
    assert torch.equal(got["conv1.3.weight"], big["conv1.3.weight"][HALF[16]][:, HALF[12]])
    assert torch.equal(got["layer1.0.conv1.weight"], big["layer1.0.conv1.weight"][HALF[16]][:, HALF[32]])
    assert torch.equal(got["layer2.0.downsample.1.weight"], big["layer2.0.downsample.1.weight"][HALF[32]][:, HALF[16]])
    assert torch.equal(got["layer4.0.conv2.weight"], big["layer4.0.conv2.weight"][HALF[128]][:, HALF[128]])
    assert torch.equal(got["layer3.0.bn2.running_var"], big["layer3.0.bn2.running_var"][HALF[64]])
    assert torch.equal(got["bn1.running_mean"], big["bn1.running_mean"][HALF[32]])
    assert "layer1 first 1 of 2" in lines[0] and "layer4 first 1 of 2" in lines[0]
    assert lines[0].startswith(f"weight selection from {run / 'student'}:")
    assert "classifier at its random init (fc.weight, fc.bias)" in lines[0]
    out = student(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == out.dist_logits.shape == (2, 10)


def test_refusals_are_one_line(larger, tmp_path, monkeypatch):
    vit, _ = larger["vit"]
    run, _ = larger["resnet"]
    cases = [
        (lambda: _vit(run), "is not of the student's family: .* tensors have no counterpart"),  # a ResNet for a ViT
        (lambda: create_student("resnet10t", 10, "dual", model_kwargs=SMALL_RESNET, init_from=vit), "not of the student"),
        (lambda: _vit(vit, arch=dict(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2.0)),
         "smaller than the student: cls_token is 1x1x12 there, cls_token is 1x1x16 in the student"),
        (lambda: _vit(vit, arch=dict(SMALL_VIT, depth=6)), "smaller than the student: 4 layers in blocks, the student "
                                                           "has 6"),
        (lambda: _vit(tmp_path / "missing.safetensors"), "no such file or folder"),
        (lambda: _vit("vit_smal_patch16_224"), "not a file or folder, and unknown model .*Did you mean"),
        (lambda: _vit(vit, pretrained_path=vit), "give one of them"),
    ]
    for make, match in cases:
        with pytest.raises(KdkitError, match=match) as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(KdkitError, match="model.init_from_layers must be one of first, uniform"):
        _vit(vit, init_from_layers="last")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(KdkitError, match="HF_HUB_OFFLINE is set: .*--init-from FILE .*kdkit student folder") as e:
        _vit("vit_small_patch16_224")
    assert time.perf_counter() - start < 5 and "\n" not in str(e.value)


def test_distill_cli_with_init_from_a_pth(larger, tiny_data, teacher_dir, tmp_path, capsys):
    """One distillation step through the real CLI from DeiT's .pth layout; the record in summary.json
    and the resolved recipe; a file of another family is one line and a non-zero exit, nothing written."""
    path, _ = larger["pth"]
    common = ["--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "deit_tiny", "--preset", "none",
              "--set", "model.kwargs={depth=2, embed_dim=8, num_heads=2, mlp_ratio=2.0}", "--img-size", "32",
              "--patch-size", "8", "--data", tiny_data, "--output", tmp_path, "--epochs", "1", "--batch-size", "64",
              "--workers", "0", "--no-progress", "--set", "optim.warmup_epochs=0"]
    assert run_cli("distill", *common, "--init-from", path, "--name", "ws") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"weight selection from {path}: 31 tensors selected" in err
    summary = json.loads((tmp_path / "ws" / "summary.json").read_text())
    assert summary["init_from"].startswith(f"weight selection from {path}:")
    assert f'init_from = "{path}"' in (tmp_path / "ws" / "recipe.toml").read_text()
    run, _ = larger["resnet"]
    assert run_cli("distill", *common, "--init-from", run, "--name", "wrong") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not of the student's family" in err[0]
    assert not (tmp_path / "wrong").exists()

"""`kdkit export`: ONNX files whose logits match PyTorch's on real images, with the preprocessing in
their metadata; plain-timm folders whose one head gives the student's fused logits without kdkit."""

import inspect
import json
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from kdkit.data import eval_transform, open_dataset
from kdkit.models import create_student, load_saved
from kdkit.models.saved import save_student
from tests.helpers import ONE_EPOCH, run_cli


def real_images(folder, data, n=None):
    """The test split's images through the student's own eval transform, (N, 3, H, W), and its outputs."""
    student, classes, dcfg = load_saved(folder)
    ds = open_dataset(data, "test", eval_transform(dcfg), classes=classes)
    images = torch.stack([ds[i]["image"] for i in range(n or len(ds))])
    with torch.no_grad():
        out = student.eval()(images)
    return images, out


def one_line_error(capsys, *argv):
    capsys.readouterr()
    code = run_cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("kdkit export: error: "), err
    return err


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("run", ["inserted", "dual"])
def test_onnx_heads_match_pytorch_on_real_images(run, tiny_runs, tiny_data, tmp_path):
    folder = tiny_runs[run] / "student"
    images, out = real_images(folder, tiny_data)
    want = {"class": out.logits, "dist": out.dist_logits, "fused": (out.logits + out.dist_logits) / 2}
    assert not torch.allclose(want["class"], want["dist"], atol=1e-3)  # the heads differ: the choice matters
    for head in ("fused", "class", "dist"):
        path = tmp_path / f"{head}.onnx"
        assert run_cli("export", tiny_runs[run], "--format", "onnx", "--head", head, "--fixed-batch", "1",
                       "--out", path) == 0
        sess = session(path)
        assert [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
        for i in range(0, len(images), 7):  # a fixed batch of one: image by image
            got = sess.run(["logits"], {"input": images[i:i + 1].numpy()})[0]
            np.testing.assert_allclose(got, want[head][i:i + 1].numpy(), atol=1e-4, rtol=0)


def test_dynamic_batch_at_two_sizes(tiny_runs, tiny_data, tmp_path):
    folder = tiny_runs["inserted"] / "student"
    images, out = real_images(folder, tiny_data)
    path = tmp_path / "dyn.onnx"
    assert run_cli("export", folder, "--format", "onnx", "--out", path) == 0  # dynamic by default, as timm's
    sess = session(path)
    fused = ((out.logits + out.dist_logits) / 2).numpy()
    for batch in (5, 60):
        got = sess.run(["logits"], {"input": images[:batch].numpy()})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, fused[:batch], atol=1e-4, rtol=0)


def test_onnx_metadata_holds_the_preprocessing(tiny_runs, tiny_data, tmp_path):
    run = tiny_runs["native"]
    assert run_cli("export", run, "--format", "onnx", "--opset", "18") == 0
    model = onnx.load(str(run / "student.onnx"))  # the default path
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    cfg = json.loads((run / "student" / "config.json").read_text())["pretrained_cfg"]
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct"):
        assert meta[key] == cfg[key], key
    assert meta["label_names"] == sorted(p.name for p in (tiny_data / "test").iterdir())
    assert meta["head"] == "fused" and meta["architecture"] == "deit_tiny_distilled_patch16_224"
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18


def test_single_head_student_has_one_output(tiny_runs, tiny_data, tmp_path, capsys):
    run = tiny_runs["single"]
    images, out = real_images(run / "student", tiny_data, 4)
    path = tmp_path / "single.onnx"
    assert run_cli("export", run, "--out", path) == 0
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    np.testing.assert_allclose(sess.run(None, {"input": images.numpy()})[0], out.logits.numpy(), atol=1e-4, rtol=0)
    assert json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["head"]) == "class"
    err = one_line_error(capsys, "export", run, "--head", "dist")
    assert "one head" in err and "--head dist" in err


def test_export_errors_are_one_line(tiny_runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.toml").write_text((tiny_runs["native"] / "recipe.toml").read_text())
    assert "holds no saved student" in one_line_error(capsys, "export", unfinished)
    assert "does not exist" in one_line_error(capsys, "export", tmp_path / "nope")
    err = one_line_error(capsys, "export", tiny_runs["dual"], "--head", "fusd")
    assert "unknown head 'fusd'" in err and "Did you mean 'fused'" in err
    assert "--opset 13" in one_line_error(capsys, "export", tiny_runs["dual"], "--opset", "13")
    assert "unknown --format" in one_line_error(capsys, "export", tiny_runs["dual"], "--format", "tflite")
    assert "ONNX options" in one_line_error(capsys, "export", tiny_runs["dual"], "--format", "safetensors",
                                            "--head", "dist")


def test_an_existing_output_is_replaced_only_with_overwrite(tiny_runs, tmp_path, capsys):
    path, folder = tmp_path / "mine.onnx", tmp_path / "timm"
    path.write_bytes(b"someone's model")
    err = one_line_error(capsys, "export", tiny_runs["dual"], "--out", path)
    assert str(path) in err and "--overwrite" in err and path.read_bytes() == b"someone's model"
    assert run_cli("export", tiny_runs["dual"], "--out", path, "--overwrite") == 0
    assert [o.name for o in session(path).get_outputs()] == ["logits"]
    assert run_cli("export", tiny_runs["dual"], "--format", "safetensors", "--out", folder) == 0
    before = (folder / "model.safetensors").read_bytes()
    err = one_line_error(capsys, "export", tiny_runs["single"], "--format", "safetensors", "--out", folder)
    assert str(folder) in err and "--overwrite" in err and (folder / "model.safetensors").read_bytes() == before
    assert run_cli("export", tiny_runs["single"], "--format", "safetensors", "--out", folder, "--overwrite") == 0
    assert (folder / "model.safetensors").read_bytes() != before


def test_without_the_export_extra_one_line_names_it(tiny_runs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it gives: ImportError
    err = one_line_error(capsys, "export", tiny_runs["dual"], "--format", "onnx")
    assert 'pip install "kdkit[export]"' in err and "onnxruntime" in err


@pytest.fixture(scope="module")
def timm_folders(tiny_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("timm")
    folders = {}
    for run in ("native", "inserted", "dual", "single"):
        folders[run] = out / run
        assert run_cli("export", tiny_runs[run], "--format", "safetensors", "--out", folders[run]) == 0
    return folders


@pytest.mark.parametrize("run", ["native", "inserted", "dual", "single"])
def test_plain_timm_reload_gives_the_fused_logits(run, tiny_runs, tiny_data, timm_folders):
    folder = timm_folders[run]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    images, out = real_images(tiny_runs[run] / "student", tiny_data)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, (out.logits + out.dist_logits) / 2, atol=1e-5, rtol=0)
    if run in ("native", "inserted"):  # the token heads become timm's distilled DeiT
        assert type(model).__name__ == "VisionTransformerDistilled"
    assert tuple(timm.data.resolve_data_config({}, model=model)["input_size"]) == (3, 32, 32)


@pytest.mark.parametrize("name, head", [("pit_ti_224", "dual"), ("pit_ti_distilled_224", "native")])
def test_pit_distils_with_the_auto_head_and_reloads_in_plain_timm(name, head, tiny_data, teacher_dir, tmp_path):
    """PiT has set_distilled_training, but a distillation head only in its distilled models."""
    assert run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--preset", "none",
                   "--student", name, "--img-size", "32", "--set", "model.kwargs={base_dims=[8, 8, 8], "
                   "depth=[1, 1, 1], heads=[1, 2, 2]}", "--data", tiny_data, *ONE_EPOCH, "--output", tmp_path,
                   "--name", "pit") == 0
    student = tmp_path / "pit" / "student"
    assert json.loads((student / "config.json").read_text())["kdkit"]["head"] == head
    images, out = real_images(student, tiny_data, 12)
    folder = tmp_path / "timm"
    assert run_cli("export", student, "--format", "safetensors", "--out", folder) == 0
    for plain in ([folder, student] if head == "native" else [folder]):  # native: the student is plain timm
        model = timm.create_model(f"local-dir:{plain}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), (out.logits + out.dist_logits) / 2, atol=1e-5, rtol=0)


def test_dual_head_collapses_to_the_averaged_linear_layer(tiny_runs, timm_folders):
    student = tiny_runs["dual"] / "student"
    model, head = load_file(str(student / "model.safetensors")), load_file(str(student / "kdkit_head.safetensors"))
    fused = load_file(str(timm_folders["dual"] / "model.safetensors"))
    for p in ("weight", "bias"):
        torch.testing.assert_close(fused[f"fc.{p}"], (model[f"fc.{p}"] + head[f"head_dist.{p}"]) / 2)
    assert all(torch.equal(fused[k], v) for k, v in model.items() if not k.startswith("fc."))


# classifiers that are not one linear layer on the pooled features: a 1x1 convolution (DLA), BatchNorm then
# linear (EfficientViT-MSRA's NormLinear), branch heads averaged (CrossViT) or softmax-weighted (EfficientViM)
NON_LINEAR_CLASSIFIERS = {
    "dla46x_c": {},
    "efficientvit_m0": dict(embed_dim=(16, 32, 48), depth=(1, 1, 1), num_heads=(2, 2, 2)),
    "crossvit_tiny_240": dict(img_scale=(1.0, 1.0), patch_size=(8, 16), embed_dim=(16, 32), depth=((1, 1, 0),),
                              num_heads=(2, 2)),
    "efficientvim_m1": dict(embed_dim=(16, 32, 64), depths=(1, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(NON_LINEAR_CLASSIFIERS))
def test_a_dual_head_collapses_into_a_classifier_that_is_not_one_linear_layer(name):
    from kdkit.models.fused import fused_timm_model

    kw = NON_LINEAR_CLASSIFIERS[name]
    student = create_student(name, 10, "dual", img_size=32, model_kwargs=kw).eval()
    with torch.no_grad():  # trained-looking statistics, so that a BatchNorm is no identity
        for m in student.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
        student.head_dist.weight.normal_(0, 0.1), student.head_dist.bias.normal_(0, 0.1)
    args = {**kw, **({"img_size": 32} if "img_size" in str(inspect.signature(type(student.model).__init__)) else {})}
    config = {"architecture": name, "num_classes": 10, "model_args": args, "kdkit": {},
              "pretrained_cfg": {"input_size": [3, 32, 32]}}
    state, cfg, _ = fused_timm_model(student, config)
    plain = timm.create_model(cfg["architecture"], num_classes=10, **cfg["model_args"]).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():  # the two heads' average, from the model's own forward and the dual head's linear map
        feats = student.model.forward_features(x)
        want = (student.model(x) + student.head_dist(student.model.forward_head(feats, pre_logits=True))) / 2
        got = plain(x)
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)
    assert not torch.allclose(got, student.model(x), atol=1e-3)  # the dual head changed it


def test_plain_timm_folder_loads_without_kdkit(tiny_runs, tiny_data, timm_folders, tmp_path):
    images, outs = {}, {}
    for run in timm_folders:
        images[run], out = real_images(tiny_runs[run] / "student", tiny_data, 12)
        outs[run] = (out.logits + out.dist_logits) / 2
    save_file(images, tmp_path / "images.safetensors")
    code = (
        "import sys, timm, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        f"images = load_file({str(tmp_path / 'images.safetensors')!r})\n"
        f"folders = {json.dumps({k: str(v) for k, v in timm_folders.items()})}\n"
        "out = {}\n"
        "for run, folder in folders.items():\n"
        "    with torch.no_grad():\n"
        "        out[run] = timm.create_model('local-dir:' + folder, pretrained=True).eval()(images[run])\n"
        f"save_file(out, {str(tmp_path / 'logits.safetensors')!r})\n"
        "print('kdkit' in sys.modules, any(m.startswith('kdkit.') for m in sys.modules))\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"], proc.stdout
    logits = load_file(str(tmp_path / "logits.safetensors"))
    for run, want in outs.items():
        torch.testing.assert_close(logits[run], want, atol=1e-5, rtol=0)
    assert time.perf_counter() - start < 300


@pytest.mark.parametrize("variant, reason", [
    (dict(global_pool="avg"), "pools with 'avg'"),  # timm's distilled DeiT reads the class token
    (dict(no_embed_class=True), "no_embed_class"),  # its position table has rows for the prefix tokens
    (dict(reg_tokens=2), "2 register tokens"),
])
def test_a_token_that_cannot_be_collapsed_is_a_clear_error(variant, reason, tmp_path, capsys):
    kw = dict(depth=1, embed_dim=32, num_heads=2, **variant)
    student = create_student("vit_tiny_patch16_224", 10, "token", img_size=32, patch_size=8, model_kwargs=kw)
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "label_names": [str(i) for i in range(10)],
           "model_args": dict(kw, img_size=32, patch_size=8),
           "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3,
                              "std": [0.5] * 3, "crop_pct": 1.0, "num_classes": 10},
           "kdkit": {"version": "test", "head": "TokenHead"}}
    save_student(tmp_path / "student", student, cfg)
    err = one_line_error(capsys, "export", tmp_path, "--format", "safetensors")
    assert reason in err and "--format onnx" in err
    assert not (tmp_path / "student-timm").exists()


@pytest.mark.parametrize("variant", [
    dict(init_values=1e-3),  # LayerScale
    dict(pre_norm=True, qkv_bias=False, mlp_ratio=2.0),  # CLIP-like pre-norm, no qkv bias, narrower MLP
    dict(qk_norm=True, final_norm=True, img_size=40),  # a non-default input size
])
def test_inserted_token_collapses_exactly_on_vit_variants(variant, tiny_data, tmp_path):
    kw = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32) | variant
    size = kw.pop("img_size")
    student = create_student("vit_tiny_patch16_224", 10, "token", img_size=size, patch_size=kw.pop("patch_size"),
                             model_kwargs=kw).eval()
    with torch.no_grad():  # a trained token and head, not the initial ones: the check must see them
        student.dist_token.normal_()
        student.head_dist.weight.normal_()
    cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 10,
           "label_names": sorted(p.name for p in (tiny_data / "test").iterdir()),
           "model_args": dict(kw, img_size=size, patch_size=8),
           "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bicubic", "mean": [0.5] * 3,
                              "std": [0.25] * 3, "crop_pct": 1.0, "num_classes": 10},
           "kdkit": {"version": "test", "head": "TokenHead"}}
    save_student(tmp_path / "student", student, cfg)
    assert run_cli("export", tmp_path / "student", "--format", "safetensors") == 0
    images, out = real_images(tmp_path / "student", tiny_data, 16)
    model = timm.create_model(f"local-dir:{tmp_path / 'student-timm'}", pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformerDistilled"
    with torch.no_grad():
        torch.testing.assert_close(model(images), (out.logits + out.dist_logits) / 2, atol=1e-5, rtol=0)

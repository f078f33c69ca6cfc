"""`kdkit compare`: the disagreement matrix against fractions computed here from the models' own
predictions on the images, read without kdkit's data pipeline."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdkit
from kdkit.analysis.compare import disagreement
from kdkit.models import create_model, create_student
from kdkit.models.saved import save_student
from tests.helpers import TINY_DEIT, run_cli

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
TINY_T2T = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, token_dim=16)


def save(folder, student, arch, classes, head, model_args):
    """A student folder as kdkit's runs write it (timm's config layout + the kdkit block)."""
    cfg = {"architecture": arch, "num_classes": len(classes), "label_names": classes, "model_args": model_args,
           "pretrained_cfg": {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": MEAN, "std": STD,
                              "crop_pct": 1.0, "num_classes": len(classes)},
           "kdkit": {"version": "test", "head": head}}
    return save_student(folder, student, cfg)


def read_images(root):
    """(N, 3, 32, 32) normalised images and (N,) labels, in ImageFolder order (sorted classes, files)."""
    classes = sorted(p.name for p in root.iterdir())
    images, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            images.append((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
            labels.append(i)
    return torch.stack(images), torch.tensor(labels), classes


@pytest.fixture(scope="module")
def students(tiny_data, tmp_path_factory):
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("students")
    classes = sorted(p.name for p in (tiny_data / "test").iterdir())
    kw = {k: v for k, v in TINY_DEIT.items() if k not in ("img_size", "patch_size")}
    vit = create_student("deit_tiny_patch16_224", 10, "token", img_size=32, patch_size=8, model_kwargs=kw).eval()
    t2t = create_student("t2t_vit_7", 10, "dual", model_kwargs=TINY_T2T).eval()
    cnn_args = dict(channels=(8, 16, 32, 64), stem_width=8)
    cnn = create_student(create_model("resnet10t", 10, **cnn_args), 10, "shared").eval()
    save(root / "vit" / "student", vit, "deit_tiny_patch16_224", classes, "TokenHead",
         dict(kw, img_size=32, patch_size=8))
    save(root / "t2t", t2t, "t2t_vit_7", classes, "DualHead", TINY_T2T)
    # The CNN's saved label order is reversed: its output j means class classes[9 - j].
    save(root / "cnn", cnn, "resnet10t", classes[::-1], "SharedHead", cnn_args)
    return root, {"vit": vit, "t2t": t2t, "cnn": cnn}


def expected_rows(students, images, labels):
    rows = {"ground truth": labels}
    with torch.no_grad():
        for name in ("vit", "t2t"):
            out = students[name](images)
            rows[f"{name} (class)"] = out.logits.argmax(1)
            rows[f"{name} (distillation)"] = out.dist_logits.argmax(1)
            rows[f"{name} (fused)"] = ((out.logits + out.dist_logits) / 2).argmax(1)
        rows["cnn"] = 9 - students["cnn"](images).logits.argmax(1)
    return rows


def test_compare_matrix_matches_fractions_computed_by_hand(tiny_data, students, tmp_path, capsys):
    root, models = students
    out = tmp_path / "cmp"
    assert run_cli("compare", "--models", root / "vit" / "student", root / "t2t", root / "cnn",
                   "--data", tiny_data, "--out", out, "--workers", 0, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "disagreement on 60 images" in printed
    assert "…" not in printed  # no number cut short in an 80-column log

    images, labels, _ = read_images(tiny_data / "test")
    rows = expected_rows(models, images, labels)
    with open(out / "disagreement.csv") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == list(rows)
    got = np.array([[float(v) for v in r[1:]] for r in table[1:]])
    assert [r[0] for r in table[1:]] == list(rows)
    names = list(rows)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            differ = sum(int(x) != int(y) for x, y in zip(rows[a].tolist(), rows[b].tolist(), strict=True))
            assert got[i, j] == pytest.approx(differ / 60, abs=1e-6), (a, b)
    assert np.all(np.diag(got) == 0) and np.array_equal(got, got.T)
    assert ((got > 0) & (got < 1)).any()  # the models do not all agree: the check above means something
    assert all(f"{100 * v:.1f}" in printed for v in got[0])  # the table prints percentages
    png = Image.open(out / "disagreement.png")
    assert png.format == "PNG" and min(png.size) > 8 * 56


def test_disagreement_is_symmetric_with_a_zero_diagonal():
    preds = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([0, 1, 0, 0]), "c": torch.tensor([1, 1, 2, 3])}
    m = disagreement(preds)
    # a-b differ at samples 2, 3; a-c at 0; b-c at 0, 2, 3
    expected = torch.tensor([[0, 2, 1], [2, 0, 3], [1, 3, 0]], dtype=torch.float64) / 4
    torch.testing.assert_close(m, expected)


def test_a_timm_name_with_a_folder_is_one_row_whose_truth_cell_is_its_error(tiny_data, tmp_path, capsys):
    from kdkit.engine.evaluate import evaluate_saved

    teacher = Path(kdkit.__file__).parent / "assets" / "teachers" / "resnet9_cifar_s"
    assert run_cli("compare", "--models", f"resnet9_cifar_s={teacher}", "--data", tiny_data, "--out", tmp_path,
                   "--workers", 0, "--no-progress") == 0
    capsys.readouterr()
    with open(tmp_path / "disagreement.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["", "ground truth", "resnet9_cifar_s"]
    top1 = evaluate_saved(teacher, str(tiny_data), workers=0, progress=False)["class_top1"]
    assert float(table[1][2]) == pytest.approx(1 - top1 / 100, abs=1e-6)


def test_compare_errors_are_one_line(tiny_data, tmp_path, capsys):
    assert run_cli("compare", "--models", tmp_path / "nothing", "--data", tiny_data, "--out", tmp_path) == 2
    tmp_path.joinpath("w.safetensors").write_bytes(b"")
    assert run_cli("compare", "--models", tmp_path / "w.safetensors", "--data", tiny_data, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "NAME=" in err

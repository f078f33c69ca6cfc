"""Bad data in a large set: every case is read as an RGB image, or skipped and counted in the
summary, or (with --strict) a one-line error, also from inside a data-loader worker."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from kdkit.data import ImageFolderDataset, load_rgb, sample_path
from tests.helpers import cli_error, run_cli

JPEG = sample_path() / "train" / "cat"


def exif_rotated(path, size=(40, 20)) -> None:
    """A JPEG stored landscape, left half red, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


READABLE = {  # name -> writer; each must load as an RGB image
    "gray16.png": lambda p: Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (32, 32), (0, 255, 0, 0)).save(p),
    "palette.png": lambda p: Image.new("P", (32, 32), 3).save(p),
    "la.png": lambda p: Image.new("LA", (32, 32), (100, 128)).save(p),
    "exif.jpg": exif_rotated,
}
UNREADABLE = {  # name -> writer; each is skipped and counted, or an error under --strict
    "zero.jpg": lambda p: p.write_bytes(b""),
    "truncated.jpg": lambda p: p.write_bytes((JPEG / "0000.jpg").read_bytes()[:-300]),
    "text.png": lambda p: p.write_text("not an image"),
}


def test_sixteen_bit_images_keep_their_brightness():
    dark = load_rgb(Image.fromarray(np.full((4, 4), 1000, np.uint16)))
    bright = load_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    assert dark.mode == "RGB" and np.asarray(dark).max() == 4  # 1000 / 257, not stretched to 255
    assert np.asarray(bright).min() == 255


def test_exif_rotation_is_applied(tmp_path):
    exif_rotated(tmp_path / "r.jpg")
    img = np.asarray(load_rgb(tmp_path / "r.jpg"))
    assert img.shape == (40, 20, 3)  # portrait once rotated
    top, bottom = img[2, 10], img[-3, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the red half is now on top


@pytest.mark.parametrize("name", sorted(READABLE))
def test_unusual_modes_load_as_rgb(tmp_path, name):
    READABLE[name](tmp_path / name)
    assert load_rgb(tmp_path / name).mode == "RGB"


@pytest.fixture(scope="module")
def bad_data(tiny_data, tmp_path_factory):
    """The tiny CIFAR slice plus every case, in both splits; an empty class folder and a stray
    non-image file in the training split."""
    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(tiny_data, root)
    for split in ("train", "test"):
        for name, write in {**READABLE, **UNREADABLE}.items():
            write(root / split / "cat" / name)
    (root / "train" / "zz_empty").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("a stray file")
    return root


def test_dataset_counts_and_skips_each_case(bad_data):
    ds = ImageFolderDataset(bad_data / "train")
    assert ds.issues() == {"empty_classes": ["zz_empty"], "ignored_files": 1}
    names = [p.split("/")[-1] for p, _ in ds.samples]
    for name in READABLE:
        assert ds.view(names.index(name))[0] is not None
    for name in UNREADABLE:
        assert ds.view(names.index(name)) == (None, -1)


FAST = ["--img-size", "32", "--epochs", "1", "--workers", "0", "--no-progress", "--set", "optim.warmup_epochs=0"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_skips_counts_and_names_bad_images_in_its_summary(bad_data, tmp_path, capsys, workers):
    # one batch holds the whole training split, so every image is drawn once
    assert run_cli("train", "--model", "resnet10t", "--data", bad_data, "--output", tmp_path, "--name", "bad",
                   *FAST, "--batch-size", "128", "--set", "run.log_every=1", "--workers", workers) == 0
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    named = {split: sorted(str(bad_data / split / "cat" / n) for n in UNREADABLE) for split in ("train", "test")}
    assert summary["data"]["train"] == {"empty_classes": ["zz_empty"], "ignored_files": 1, "skipped_images": 3,
                                        "skipped_names": named["train"]}
    assert summary["data"]["eval"] == {"empty_classes": [], "ignored_files": 0, "skipped_images": 3,
                                       "skipped_names": named["test"]}
    assert summary["eval"]["n"] == 60 + len(READABLE)
    assert summary["classes"] == 11  # the empty class folder is a class without samples
    # the console names them too (the first three: here all)
    out = " ".join(capsys.readouterr().out.split())
    assert f"3 unreadable training images (views, over the epochs): {', '.join(named['train'])} (see summary.json)" \
        in out, out
    assert f"3 unreadable skipped: {', '.join(named['test'])}" in out, out


def test_strict_makes_each_case_an_error_in_one_line(bad_data, tmp_path, capsys):
    common = ["train", "--model", "resnet10t", "--data", bad_data, "--output", tmp_path, *FAST, "--batch-size", "16"]
    assert "class folders without images: ['zz_empty']" in cli_error(capsys, *common, "--strict")
    shutil.rmtree(bad_data / "train" / "zz_empty")
    try:
        assert "unreadable image" in cli_error(capsys, *common, "--strict")
        # from a worker process too: the error reaches the main process, in one line
        err = cli_error(capsys, *common, "--strict", "--workers", "1")
        assert "unreadable image" in err and "DataLoader worker" in err
    finally:
        (bad_data / "train" / "zz_empty").mkdir()

"""Data given to the Python API as objects: a torch Dataset, a DataLoader, a datasets DatasetDict,
an in-memory list. Each run is compared with the same run from the folder (every step's metrics
and the student's weights), which holds only if the views, the order and the labels are the same."""

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, WeightedRandomSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor, to_tensor

import kdkit
from kdkit.data import TorchImageDataset, open_dataset
from tests.helpers import TinyConvNet, assert_same_run

RUN = dict(img_size=32, batch_size=16, workers=0, warmup_epochs=0, progress=False, head="dual",
           checkpoint_every=0, ema_decay=0.9, lr=1e-3)


class Pairs(Dataset):
    """A user's in-memory dataset: (image, class) pairs in a list, images as `kind`."""

    def __init__(self, root, kind: str = "pil"):
        folder = ImageFolder(str(root))
        self.items = []
        for path, target in folder.samples:
            img = Image.open(path).convert("RGB")
            image = {"pil": img, "uint8": pil_to_tensor(img), "float": to_tensor(img)}[kind]
            self.items.append((image, torch.tensor(target)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _hf_dict(root):
    import datasets

    def split(name):
        folder = ImageFolder(str(root / name))
        return datasets.Dataset.from_dict({"img": [p for p, _ in folder.samples], "label": folder.targets},
                                          features=datasets.Features({"img": datasets.Image(),
                                                                      "label": datasets.ClassLabel(names=folder.classes)}))

    return datasets.DatasetDict({"train": split("train"), "test": split("test")})


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet()


def test_a_run_from_a_dataset_a_loader_or_a_datasetdict_is_the_run_from_the_folder(tiny_data, teacher_dir, student,
                                                                                     tmp_path):
    common = dict(teacher_weights=str(teacher_dir), epochs=1, output=str(tmp_path), **RUN)
    kdkit.distill(student, "resnet10t", tiny_data, name="folder", **common)
    train, test = ImageFolder(str(tiny_data / "train")), ImageFolder(str(tiny_data / "test"))
    # a DatasetDict: its train split trains, its test split evaluates
    result = kdkit.distill(student, "resnet10t", _hf_dict(tiny_data), name="dict", **common)
    assert_same_run(tmp_path / "dict", tmp_path / "folder")
    assert result.summary["eval_images"] == 60
    # a DataLoader over a torch Dataset: its batch size and workers are the run's; kdkit draws the order
    loader = DataLoader(train, batch_size=16, shuffle=True, num_workers=0)
    loader_run = {k: v for k, v in common.items() if k not in ("batch_size", "workers")}
    result = kdkit.distill(student, "resnet10t", loader, eval_data=test, name="loader", **loader_run)
    assert_same_run(tmp_path / "loader", tmp_path / "folder")
    identity = result.summary["data_identity"]["train"]
    assert identity["source"] == "<DataLoader ImageFolder>"
    # torchvision's ImageFolder has the folder's own fingerprint: a logit cache of the folder serves it
    assert identity["fingerprint"] == open_dataset(tiny_data, "train").fingerprint()


def test_a_run_from_an_in_memory_dataset_resumes_exactly(tiny_data, teacher_dir, student, tmp_path):
    """Two epochs from a list of (PIL image, class) pairs; then the run cut back to its first
    epoch's checkpoint and resumed from it: the same steps, the same weights."""
    train, test = Pairs(tiny_data / "train"), Pairs(tiny_data / "test")
    common = dict(teacher_weights=str(teacher_dir), output=str(tmp_path), eval_data=test, epochs=2, **RUN)
    result = kdkit.distill(student, "resnet10t", train, name="whole", **common)
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    first, last = sorted((tmp_path / "stopped" / "checkpoints").iterdir())
    shutil.rmtree(last)
    kdkit.distill(student, "resnet10t", train, resume=tmp_path / "stopped", name="stopped", **common)
    assert_same_run(tmp_path / "stopped", tmp_path / "whole")
    fingerprint = result.summary["data_identity"]["train"]["fingerprint"]
    assert fingerprint == TorchImageDataset(Pairs(tiny_data / "train", "uint8")).fingerprint()


def test_tensor_images_are_the_pil_images_exactly(tiny_data):
    """uint8 tensors and ToTensor's floats in [0, 1] are read back to the very pixels of the files;
    the fingerprint follows the content: the same for the same pixels, another for one pixel changed."""
    root = tiny_data / "test"
    folder = open_dataset(tiny_data, "test")
    views = {kind: TorchImageDataset(Pairs(root, kind)) for kind in ("pil", "uint8", "float")}
    for i in (0, 17, 59):
        want = np.asarray(folder.read(i)[0].convert("RGB"))
        for ds in views.values():
            img, target = ds.read(i)
            assert np.array_equal(np.asarray(img), want) and target == folder.read(i)[1]
    assert len({ds.fingerprint() for ds in views.values()}) == 1
    changed = Pairs(root, "uint8")
    changed.items[5][0][0, 0, 0] += 1
    assert TorchImageDataset(changed).fingerprint() != views["uint8"].fingerprint()
    assert views["pil"].classes == [str(i) for i in range(10)]  # no `classes` attribute: the label indices


class Augmenting(Pairs):
    def __getitem__(self, i):
        img, y = self.items[i]
        return img.rotate(float(torch.rand(()) * 30)), y


class Normalised(Pairs):
    def __getitem__(self, i):
        img, y = self.items[i]
        return (to_tensor(img) - 0.5) / 0.25, y


class Stream(IterableDataset):
    def __iter__(self):
        yield from ()


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: DataLoader(ImageFolder(str(root / "train")), batch_size=8,
                             sampler=WeightedRandomSampler([1.0] * 120, 120)),
     "the DataLoader's WeightedRandomSampler decides which samples an epoch draws"),
    (lambda root: DataLoader(Stream(), batch_size=8), "the DataLoader reads an IterableDataset (Stream)"),
    (lambda root: Stream(), "the Stream is an IterableDataset: it draws its own order"),
    (lambda root: Augmenting(root / "train"), "gives another image each time sample 0 is read: it augments itself"),
    (lambda root: Normalised(root / "train"), "normalised tensors; give kdkit the raw images"),
    (lambda root: [1, 2, 3], "the list gives int items: expected (image, class) pairs"),
])
def test_data_kdkit_cannot_replay_is_refused_in_one_line_before_anything_is_written(make, message, tiny_data,
                                                                                     tmp_path):
    with pytest.raises(kdkit.KdkitError, match=re.escape(message)) as e:
        kdkit.distill(TinyConvNet(), TinyConvNet(), make(tiny_data), epochs=1, output=str(tmp_path), **RUN)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_datasets_format_or_transform_is_set_aside_for_the_raw_images(tiny_data, capsys):
    """A datasets.Dataset formatted for torch (or with a transform) gives tensors; kdkit reads its
    stored images instead, the very pixels of the files, and says so."""
    folder = open_dataset(tiny_data, "test")
    formatted = _hf_dict(tiny_data)["test"].with_format("torch")
    ds = open_dataset(formatted, "auto-eval")
    assert "format (torch) is set aside" in capsys.readouterr().err
    for i in (0, 31):
        img, target = ds.read(i)
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(folder.read(i)[0])) and target == folder.read(i)[1]
    assert ds.classes == folder.classes

"""Every model family timm registers as a kdkit student (bench/families.py walks them all): the table
names each family, and a few walk here through every stage (one distillation step with the automatic
head, saved, reloaded, plain timm, ONNX), each stage checked against the trained student's own fused
logits; every head works or is refused naming a head that works."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "families.py"


@pytest.fixture(scope="module")
def families():
    spec = importlib.util.spec_from_file_location("kdkit_bench_families", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def inputs(families, tmp_path_factory):
    return families.make_inputs(tmp_path_factory.mktemp("families"))


def test_the_table_names_every_family_timm_registers(families):
    registered = families.registered_families()
    assert len(registered) >= 98  # timm 1.0.31's modules, and kdkit's t2t_vit and cifar
    assert set(families.FAMILIES) == set(registered), set(registered) ^ set(families.FAMILIES)
    assert not set(families.CANNOT) - set(families.FAMILIES) - set(families.DISTILLED)


# kdkit's T2T-ViT (the token head, exported to ONNX and as a distilled T2T-ViT) and a distilled PiT (its own
# head, native); the others in bench/families.py (classifiers that are not one linear layer: test_export.py)
WALKED = ["t2t_vit", "pit (distilled)"]


@pytest.mark.parametrize("name", WALKED)
def test_a_family_distils_saves_reloads_in_plain_timm_and_exports_to_onnx(families, inputs, tmp_path, name):
    data, teacher = inputs
    row = families.walk(name, {**families.FAMILIES, **families.DISTILLED}[name], data, teacher, tmp_path)
    assert row["stages"] == dict.fromkeys(families.STAGES, "ok"), row["stages"]
    assert row["untruthful"] == [], row["untruthful"]
    want_head = {"t2t_vit": "token", "pit (distilled)": "native"}.get(name, "dual")
    assert row["auto_head"] == want_head
    assert row["diff_reload"] == 0.0  # the saved weights are the trained ones, bit for bit
    assert row["heads"][want_head] == "ok"

"""`kdkit benchmark`: parameter counts and FLOPs against hand counts; throughput rows through the CLI."""

import json

import pytest
from torch import nn

from kdkit import KdkitError
from kdkit.engine.benchmark import CPU_BATCH_CAP, benchmark_model, count_flops, largest_batch
from kdkit.models import create_model

from .conftest import run_cli


def test_linear_only_model_flops_follow_the_hand_formula():
    """A Linear layer on one sample costs in * out multiply-adds = 2 * in * out FLOPs (the bias add
    is element-wise, not counted)."""
    assert count_flops(nn.Linear(48, 10), (48,)) == 2 * 48 * 10
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    row = benchmark_model(mlp, input_shape=(3, 8, 8), batch_size=4, warmup=0, repeats=1, device="cpu")
    assert row["gflops"] * 1e9 == pytest.approx(2 * (192 * 32 + 32 * 10))
    assert row["gmacs"] * 2 == pytest.approx(row["gflops"])
    assert row["params"] == 192 * 32 + 32 + 32 * 10 + 10
    assert row["batch_size"] == 4 and row["images_per_s"] > 0 and row["input_shape"] == [3, 8, 8]


def test_cpu_batch_defaults_to_the_cap():
    row = benchmark_model(nn.Linear(8, 2), input_shape=(8,), warmup=0, repeats=1, device="cpu")
    assert row["batch_size"] == CPU_BATCH_CAP and row["device"] == "cpu" and row["dtype"] == "float32"


def test_largest_batch_doubles_until_memory_runs_out():
    tried = []

    def fits_up_to(limit):
        def fits(batch):
            tried.append(batch)
            return batch <= limit
        return fits

    assert largest_batch(fits_up_to(100), cap=1024) == 64 and tried == [8, 16, 32, 64, 128]
    assert largest_batch(fits_up_to(10_000), cap=1024) == 1024
    tried.clear()
    assert largest_batch(fits_up_to(5), cap=1024) == 4 and tried == [8, 4]
    with pytest.raises(KdkitError, match="batch 1"):
        largest_batch(fits_up_to(0), cap=1024)


def test_cli_json_rows_count_the_model_parameters(capsys):
    code = run_cli("benchmark", "--models", "resnet10t", "t2t_vit_7", "--img-size", "32", "--num-classes", "10",
                   "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json")
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["resnet10t", "t2t_vit_7"]
    for r in rows:
        model = create_model(r["model"], 10, img_size=32)
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert r["input_shape"] == [3, 32, 32] and r["batch_size"] == 2
        assert r["gflops"] == pytest.approx(count_flops(model, (3, 32, 32)) / 1e9)
        assert r["images_per_s"] > 0


def test_cli_table_and_bad_values(capsys):
    assert run_cli("benchmark", "--models", "resnet10t", "--img-size", "32", "--batch-size", "1",
                   "--repeats", "1", "--device", "cpu") == 0
    assert "resnet10t" in capsys.readouterr().out
    assert run_cli("benchmark", "--models", "resnet10t", "--batch-size", "0") == 2
    assert run_cli("benchmark", "--models", "resnet5O", "--device", "cpu") == 2
    assert "Did you mean" in capsys.readouterr().err

"""`kdkit benchmark`: parameter counts and FLOPs against hand counts; throughput rows through the CLI."""

import json

import pytest
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from kdkit import KdkitError
from kdkit.analysis.benchmark import CPU_BATCH_CAP, benchmark_model, largest_batch
from kdkit.models import create_model
from kdkit.models.flops import ATTENTION_KERNELS, attention_flops, count_flops
from tests.helpers import run_cli


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


def _deit_tiny_macs(tokens=197, dim=192, mlp=768, depth=12, patches=196, patch_in=16 * 16 * 3, classes=1000):
    """DeiT-Ti's multiply-adds written out: per block qkv (3D), projection (D) and MLP (2 x 4D) on every
    token, plus attention's Q K^T and A V (N x N x D each, summed over heads); the patch embedding
    and the class head."""
    block = tokens * dim * (3 * dim + dim + 2 * mlp) + 2 * tokens * tokens * dim
    return depth * block + patches * patch_in * dim + dim * classes


@pytest.mark.parametrize(("name", "published_gmacs", "exact_macs"), [
    ("deit_tiny_patch16_224", 1.26, _deit_tiny_macs()),  # timm's table (DeiT paper: 1.3)
    ("swin_tiny_patch4_window7_224", 4.5, None),  # Swin paper, Table 1 ("FLOPs" = multiply-adds)
    ("resnet50", 4.1, None),  # ResNet paper, Table 1 (3.8 there: timm's v1.5 strides the 3x3 conv)
])
def test_flops_match_published_counts(name, published_gmacs, exact_macs):
    """The counts of the papers and timm's tables, on CPU whatever kernel runs attention (torch's own
    counter alone gives DeiT-Ti 1.08: the fused CPU attention kernel was not counted). Built on the
    meta device (no weights, no arithmetic: fast); DeiT-Ti also runs on CPU."""
    with torch.device("meta"):
        model = timm.create_model(name)
    flops = count_flops(model, (3, 224, 224), "meta")
    assert flops / 2e9 == pytest.approx(published_gmacs, rel=0.03)
    if exact_macs is not None:
        assert flops == 2 * exact_macs
        assert count_flops(timm.create_model(name), (3, 224, 224)) == flops


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_every_cpu_attention_kernel_counts_the_same(backend):
    """A ViT's attention counts as its two matmuls written out (timm's unfused path) under each CPU kernel."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)
    with sdpa_kernel([backend]):
        fused = count_flops(model, (3, 32, 32))
    for m in _attention_modules(model):
        m.fused_attn = False
    assert fused == count_flops(model, (3, 32, 32))


def test_cpu_flash_attention_adds_its_two_products():
    """What kdkit adds to torch's counter on CPU's flash kernel: Q K^T and A V, 65 x 65 x 192
    multiply-adds each (64 patches + class token, D = 192, summed over heads), in each of 2 blocks."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10).eval()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with FlopCounterMode(display=False) as torch_only, torch.inference_mode():
            model(torch.zeros(1, 3, 32, 32))
        fused = count_flops(model, (3, 32, 32))
    assert fused - torch_only.get_total_flops() == 2 * (2 * 2 * 65 * 65 * 192)


def test_every_fused_attention_kernel_has_a_formula():
    """Each of torch's fused attention kernels (CUDA, CPU, MPS, other backends) is counted: by torch's own
    formula or by ATTENTION_KERNELS, whose formula is checked against two matmuls."""
    kernels = [n for n in dir(torch.ops.aten) if n.startswith("_scaled_dot_product_") and not n.endswith("_backward")
               # composite ones (the math fallback) run as matmuls, which torch counts
               and not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{n}", "CompositeImplicitAutograd")]
    assert "_scaled_dot_product_flash_attention_for_cpu" in kernels and len(kernels) >= 5
    known = set(flop_registry) | set(ATTENTION_KERNELS)
    assert [n for n in kernels if getattr(torch.ops.aten, n) not in known] == []
    q, k, v = (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4)
    with FlopCounterMode(display=False) as c:
        torch.randn(q) @ torch.randn(k).transpose(-1, -2) @ torch.randn(v)
    assert attention_flops(q, k, v) == c.get_total_flops()

"""Counting a model's size and compute: parameters, and FLOPs of one forward pass on one sample.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`: matrix products, convolutions and
attention, where one multiply-add is 2 FLOPs. Element-wise operations, norms and softmax are not
counted.

Fused attention (`F.scaled_dot_product_attention`) runs one of several kernels. torch's counter
knows the CUDA ones (flash, memory-efficient, cuDNN) and the math fallback (plain matmuls), but
not CPU's flash kernel, which every timm ViT uses on CPU: without ATTENTION_KERNELS DeiT-Ti counts
1.08 GMACs, its two attention products (Q K^T and A V) missing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdkit.models.student import eval_mode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def attention_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...],
                    *args: object, out_shape: object = None, **kwargs: object) -> int:
    """FLOPs of scaled dot-product attention's two products: scores Q K^T, (..., Lq, E) x (..., E, Lk),
    then A V, (..., Lq, Lk) x (..., Lk, Ev); 2 per multiply-add, over the query's leading
    (batch, heads) dims (grouped keys/values are broadcast to the query's heads). Masks, scaling
    and softmax are element-wise, not counted; a causal mask is counted in full, as torch does."""
    *lead, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    return 2 * math.prod(lead) * lq * lk * (e + ev)


_aten = torch.ops.aten
# Forward attention kernels torch's FlopCounterMode has no formula for (it has the CUDA ones):
# CPU's flash kernel, the MPS math kernel and the out-of-tree backends' overridable one. Each takes
# (query, key, value, ...) first.
ATTENTION_KERNELS = {op: attention_flops for op in (
    _aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_attention_math_for_mps,
    _aten._scaled_dot_product_fused_attention_overrideable)}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (no table printed) that also counts every fused attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_KERNELS)


def count_flops(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward pass on one sample of `input_shape` (e.g. (3, 224, 224)), 2 per multiply-add.

    Runs in float32 without autocast; attention counts the same whichever kernel runs it (see
    ATTENTION_KERNELS)."""
    x = torch.zeros(1, *input_shape, device=device)
    # autograd left on: the counter's module tracker fails on a view of a parameter passed between
    # modules (PiT's expanded class token) under inference_mode or no_grad; nothing runs backward
    with eval_mode(model), flop_counter() as counter:
        model(x)
    return int(counter.get_total_flops())

"""Small ConvNets for 32x32 images, registered with timm so `--model resnet9_cifar` works like any
timm name (and `timm.create_model` builds them once kdkit is imported).

ResNet-9 follows the DAWNBench CIFAR-10 network (Page, 2018): prep conv, three stages of
conv-BN-ReLU with max-pooling, residual pairs after stages 1 and 3, global max-pool, linear,
logits scaled by 1/8.
`width` is the prep conv's width (64 in the original); `resnet9_cifar_s` halves it (1.6M params).

The model speaks timm's ConvNet API: four feature levels (`feature_info`: the prep conv at stride 1,
then the ends of the three stages at strides 2, 4, 8), `forward_intermediates` /
`prune_intermediate_layers`, `features_only=True`, gradient checkpointing, TorchScript and FX.
"""

from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
POOLS = ("max", "avg", "avgmax", "")


def _conv_bn(cin: int, cout: int, pool: bool = False, **dd: Any) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False, **dd), nn.BatchNorm2d(cout, **dd), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, dim: int, **dd: Any):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(dim, dim, **dd), _conv_bn(dim, dim, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 for 32x32 inputs. forward: (B, 3, 32, 32) -> (B, num_classes).

    Args:
        global_pool: "max" (Page's, default), "avg", "avgmax" or "" (no pooling: forward_head
            returns the (B, 8 * width, H/8, W/8) map).
        drop_rate: dropout before the classifier.
        drop_path_rate: accepted so that recipes setting stochastic depth for every student
            (the DeiT preset) run; ResNet-9 has none and ignores it.
        logit_scale: factor on the logits (1/8, Page's); pooled features (num_classes=0,
            pre_logits) are not scaled.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 64, global_pool: str = "max",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, logit_scale: float = 0.125,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, not {global_pool!r}")
        dd = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        w = width
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = 8 * w
        self.grad_checkpointing = False
        self.features = nn.Sequential(
            _conv_bn(in_chans, w, **dd),
            _conv_bn(w, 2 * w, pool=True, **dd), Residual(2 * w, **dd),
            _conv_bn(2 * w, 4 * w, pool=True, **dd),
            _conv_bn(4 * w, 8 * w, pool=True, **dd), Residual(8 * w, **dd),
        )
        # the feature levels end after these modules of `features`
        self.stage_ends = [0, 2, 3, 5]
        self.feature_info = [dict(num_chs=c * w, reduction=r, module=f"features.{i}")
                             for c, r, i in zip((1, 2, 4, 8), (1, 2, 4, 8), self.stage_ends, strict=True)]
        self.global_pool = global_pool
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(8 * w, num_classes, **dd) if num_classes > 0 else nn.Identity()
        # Page's scaling of the logits: max-pooled features are large, and unscaled logits make
        # the high learning rates of fast CIFAR schedules diverge.
        self.logit_scale = logit_scale

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (none with num_classes=0) on the device and dtype of the model; the
        pooling is kept unless `global_pool` is given."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be one of {POOLS}, not {global_pool!r}")
            self.global_pool = global_pool
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        w = self.features[0][0].weight
        self.fc = (nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0
                   else nn.Identity())
        self.fc.train(self.training)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The feature maps at `indices` of the four levels (an int n: the last n; None: all), each
        (B, C_i, H / r_i, W / r_i), and the final features (forward_features' output).

        `norm` is accepted for timm's interface (ResNet-9 has no final norm); `stop_early` stops
        after the last level asked for (the final features are then that level's map); only NCHW.
        Returns (final, intermediates), or the intermediates alone with intermediates_only.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for ResNet-9, not {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_modules = [self.stage_ends[i] for i in take_indices]
        if torch.jit.is_scripting() or not stop_early:  # a Sequential cannot be sliced in TorchScript
            stages = self.features
        else:
            stages = self.features[:self.stage_ends[max_index] + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x)
            else:
                x = stage(x)
            if i in take_modules:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last level in `indices` (and the classifier with prune_head);
        returns the absolute indices to pass to forward_intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        self.features = self.features[:self.stage_ends[max_index] + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 8 * width, H/8, W/8)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) features -> (B, num_classes) logits, or the pooled (B, C) with pre_logits."""
        x = self.drop(self.pool(x))
        if pre_logits or self.num_classes == 0:
            return x
        return self.fc(x) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict:
    # pool_size: the unpooled feature map at input_size (32 / 8)
    return {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "first_conv": "features.0.0", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({"resnet9_cifar.untrained": _cfg(), "resnet9_cifar_s.untrained": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet9:
    return build_model_with_cfg(ResNet9, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def resnet9_cifar(pretrained: bool = False, **kwargs: Any) -> ResNet9:
    """ResNet-9 (width 64, 6.6M params) for 32x32 images."""
    return _create("resnet9_cifar", pretrained, **dict({"width": 64}, **kwargs))


@register_model
def resnet9_cifar_s(pretrained: bool = False, **kwargs: Any) -> ResNet9:
    """ResNet-9 at half width (32, 1.6M params) for 32x32 images: kdkit's bundled CIFAR-10 teacher."""
    return _create("resnet9_cifar_s", pretrained, **dict({"width": 32}, **kwargs))

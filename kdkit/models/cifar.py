"""Small ConvNets for 32x32 images, registered with timm so `--model resnet9_cifar` works like any
timm name (and `timm.create_model` builds them once kdkit is imported).

ResNet-9 follows the DAWNBench CIFAR-10 network (Page, 2018): prep conv, three stages of
conv-BN-ReLU with max-pooling, residual pairs after stages 1 and 3, global max-pool, linear,
logits scaled by 1/8.
`width` is the prep conv's width (64 in the original); `resnet9_cifar_s` halves it (1.6M params).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(dim, dim), _conv_bn(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 for 32x32 inputs. forward: (B, 3, 32, 32) -> (B, num_classes)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 64, drop_rate: float = 0.0,
                 logit_scale: float = 0.125, **_: object):
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 8 * w
        self.features = nn.Sequential(
            _conv_bn(in_chans, w),
            _conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(8 * w, num_classes) if num_classes > 0 else nn.Identity()
        # Page's scaling of the logits: max-pooled features are large, and unscaled logits make
        # the high learning rates of fast CIFAR schedules diverge.
        self.logit_scale = logit_scale

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (1, 1), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "first_conv": "features.0.0", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({"resnet9_cifar.untrained": _cfg(), "resnet9_cifar_s.untrained": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs: object) -> ResNet9:
    return build_model_with_cfg(ResNet9, variant, pretrained, **kwargs)


@register_model
def resnet9_cifar(pretrained: bool = False, **kwargs: object) -> ResNet9:
    """ResNet-9 (width 64, 6.6M params) for 32x32 images."""
    return _create("resnet9_cifar", pretrained, **dict({"width": 64}, **kwargs))


@register_model
def resnet9_cifar_s(pretrained: bool = False, **kwargs: object) -> ResNet9:
    """ResNet-9 at half width (32, 1.6M params) for 32x32 images: kdkit's bundled CIFAR-10 teacher."""
    return _create("resnet9_cifar_s", pretrained, **dict({"width": 32}, **kwargs))

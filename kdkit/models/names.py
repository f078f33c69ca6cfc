"""Short names for the models of the DeiT paper, resolved to timm names (any timm name works too)."""

from __future__ import annotations

import timm

from kdkit.registry import KdkitError, suggest

ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_distilled_patch16_224",
    "deit_small": "deit_small_distilled_patch16_224",
    "deit_base": "deit_base_distilled_patch16_224",
    "deit_base_384": "deit_base_distilled_patch16_384",
    # RegNetY-16GF with the weights DeiT trained and used as its teacher (82.9% ImageNet top-1).
    "regnety_160": "regnety_160.deit_in1k",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
}


def resolve_model_name(name: str) -> str:
    """Map a short name to a timm name and check that timm knows it.

    Returns the timm name, possibly with a pretrained tag ("regnety_160.deit_in1k").
    Raises KdkitError with the closest names when the model is unknown.
    """
    full = ALIASES.get(name, name)
    arch = full.split(".")[0]
    if not timm.is_model(arch):
        choices = list(ALIASES) + timm.list_models()
        raise KdkitError(f"unknown model {name!r}.{suggest(name, choices)} (any timm model name works)")
    return full

"""T2T-ViT (Yuan et al., 2021, "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet"), registered with timm so `timm.create_model("t2t_vit_14")` and `--student t2t_vit_14` work.

Instead of cutting the image into disjoint 16x16 patches, the tokens-to-token (T2T) module
re-structurises the image three times:

    image (B, 3, H, W)
      soft split 0: nn.Unfold(7, stride 4, padding 2)     -> (B, N0, 3*7*7)    N0 = (H/4)^2
      T2T transformer layer (147 -> token_dim)            -> (B, N0, token_dim)
      reconstruction: tokens back to an image              -> (B, token_dim, H/4, W/4)
      soft split 1: nn.Unfold(3, stride 2, padding 1)     -> (B, N1, token_dim*9)  N1 = (H/8)^2
      T2T transformer layer (token_dim*9 -> token_dim), reconstruction
      soft split 2: nn.Unfold(3, stride 2, padding 1)     -> (B, N2, token_dim*9)  N2 = (H/16)^2
      linear projection                                    -> (B, N2, embed_dim)

Each split's side is the paper's eq. 3, floor((h + 2p - k) / s) + 1: 224 -> 56 -> 28 -> 14 (196
tokens), 32 -> 8 -> 4 -> 2 (4 tokens). A class token and a position embedding (fixed sinusoidal as
in the paper, or learned) are added, then a deep-narrow ViT backbone of timm `Block`s follows.

The T2T layers are the paper's "transformer" variant (T2T-ViT_t), with the small token width the
paper uses (64). Model names (no pretrained weights; ImageNet normalisation, 224x224 by default):

    t2t_vit_7    embed 256, depth 7,  heads 4, mlp_ratio 2
    t2t_vit_12   embed 256, depth 12, heads 4, mlp_ratio 2
    t2t_vit_14   embed 384, depth 14, heads 6, mlp_ratio 3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = ["T2TLayer", "T2TViT", "TokensToToken", "sinusoid_table", "soft_split_size", "split_sizes"]

# (kernel, stride, padding) of the three soft splits (paper, section 3.2)
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the token grid after one soft split (the paper's eq. 3, as nn.Unfold computes it)."""
    return (size + 2 * padding - kernel) // stride + 1


def split_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """[(h, w) of the input, then of the token grid after each of the three soft splits]."""
    sizes = [(h, w)]
    for k, s, p in SOFT_SPLITS:
        sizes.append((soft_split_size(sizes[-1][0], k, s, p), soft_split_size(sizes[-1][1], k, s, p)))
    return sizes


def sinusoid_table(n: int, dim: int) -> Tensor:
    """(1, n, dim) sinusoidal position table (Vaswani et al.): sin on even, cos on odd channels,
    wavelengths from 2*pi to 10000*2*pi."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -(torch.arange(dim) // 2 * 2).double() / dim)[None, :]
    angle = pos * freq
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class T2TLayer(nn.Module):
    """One T2T transformer layer: single-head attention that maps in_dim tokens to token_dim, then an
    MLP. (B, N, in_dim) -> (B, N, token_dim).

    Input and output widths differ, so the attention's residual is its value projection (the one
    path that already has token_dim channels); the MLP's residual is the usual one.
    """

    def __init__(self, in_dim: int, token_dim: int, mlp_ratio: float = 1.0, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.qkv = nn.Linear(in_dim, 3 * token_dim, bias=qkv_bias)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, int(token_dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = v + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T module: (B, C, H, W) image -> (B, N, embed_dim) tokens, N = grid[0] * grid[1].

    `grid` is the final token grid for img_size (see the module docstring for the split sizes).
    """

    def __init__(self, img_size: tuple[int, int], in_chans: int = 3, token_dim: int = 64, embed_dim: int = 384):
        super().__init__()
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(k2, stride=s2, padding=p2)
        self.attention1 = T2TLayer(in_chans * k0 * k0, token_dim)
        self.attention2 = T2TLayer(token_dim * k1 * k1, token_dim)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.sizes = split_sizes(*img_size)
        self.grid = self.sizes[-1]
        self.num_patches = self.grid[0] * self.grid[1]

    @staticmethod
    def _reconstruct(tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, h*w, C) tokens -> (B, C, h, w) image, so that the next soft split sees neighbours."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)

    def forward(self, x: Tensor) -> Tensor:
        sizes = split_sizes(*x.shape[-2:])
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = self.attention2(self.soft_split1(self._reconstruct(x, sizes[1])).transpose(1, 2))
        return self.project(self.soft_split2(self._reconstruct(x, sizes[2])).transpose(1, 2))


class T2TViT(nn.Module):
    """T2T-ViT classifier with timm's ViT interface. forward: (B, C, H, W) -> (B, num_classes).

    Args:
        img_size: input size (int or (H, W)); it fixes the token grid and the position table
            (32 -> a 2x2 grid). Default 224.
        token_dim: width of the T2T layers (64 in the paper).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT backbone of timm `Block`s.
        global_pool: "token" (class token, the paper's), "avg" (mean of the patch tokens) or "".
        learned_pos: learn the position embedding instead of the paper's fixed sinusoid.
        drop_rate, pos_drop_rate, attn_drop_rate, proj_drop_rate, drop_path_rate: dropout rates
            (drop_path linearly increasing over the blocks, as in DeiT).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", token_dim: int = 64, embed_dim: int = 384, depth: int = 14,
                 num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False, learned_pos: bool = False,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', not {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.tokens_to_token = TokensToToken(to_2tuple(img_size), in_chans, token_dim, embed_dim)
        self.num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # The paper fixes a sinusoidal table; a Parameter either way, so checkpoints and timm's
        # position-embedding helpers see the usual `pos_embed` (1, 1 + N, embed_dim).
        self.pos_embed = nn.Parameter(sinusoid_table(1 + self.num_patches, embed_dim), requires_grad=learned_pos)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # Identity, kept for timm's interface: kdkit's `token` head inserts its distillation token
        # through a forward pre-hook here, after the position embedding and before the blocks.
        self.patch_drop = nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as in DeiT
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        if learned_pos:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_prefix_tokens + N, embed_dim), after the final norm."""
        x = self.tokens_to_token(x)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"input {tuple(x.shape)} gives {x.shape[1]} tokens, the model was built for "
                             f"{self.num_patches} (img_size {self.tokens_to_token.sizes[0]})")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x + self.pos_embed.to(x.dtype))
        x = self.patch_drop(x)
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, T, embed_dim) features -> (B, num_classes) logits, or (B, embed_dim) with pre_logits."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: object) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "tokens_to_token.attention1.qkv", "classifier": "head",
            **kwargs}


default_cfgs = generate_default_cfgs({"t2t_vit_7.untrained": _cfg(), "t2t_vit_12.untrained": _cfg(),
                                      "t2t_vit_14.untrained": _cfg()})


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> T2TViT:
    return build_model_with_cfg(T2TViT, variant, pretrained, **{**defaults, **kwargs})


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: object) -> T2TViT:
    """T2T-ViT-7: embed 256, depth 7, 4 heads, mlp_ratio 2 (4.3M params at 1000 classes)."""
    return _create("t2t_vit_7", pretrained, dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0), kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: object) -> T2TViT:
    """T2T-ViT-12: embed 256, depth 12, 4 heads, mlp_ratio 2 (6.9M params at 1000 classes)."""
    return _create("t2t_vit_12", pretrained, dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0), kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: object) -> T2TViT:
    """T2T-ViT-14: embed 384, depth 14, 6 heads, mlp_ratio 3 (21.5M params at 1000 classes)."""
    return _create("t2t_vit_14", pretrained, dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0), kwargs)


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

The model speaks timm's ViT API: `forward_intermediates` / `prune_intermediate_layers` over the
blocks (feature_info: one level per block, stride 16), `features_only=True` (FeatureGetterNet, the
last 3 blocks by default, as timm's ViT), gradient checkpointing (blocks and T2T layers),
`set_input_size` and `dynamic_img_size` (position embedding resampled as timm's ViT does),
`group_matcher` / `no_weight_decay` for timm's optimizer factory, TorchScript and torch.fx.
The fixed sinusoidal table is a buffer (still `pos_embed` in the state dict); a learned one is a
Parameter.

`distilled=True` adds DeiT's distillation token and head, as timm's VisionTransformerDistilled: the
token sits after the class token with no position embedding (it is inserted after the position
embedding, where kdkit's `token` head inserts its own), `head_dist` reads it, and the model returns
(class, dist) logits in training after `set_distilled_training(True)`, their average otherwise. A
T2T-ViT student distilled with kdkit's `token` head is saved as such a model.
"""

import math
from typing import Any, Final

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, global_pool_nlc
from torch import Tensor, nn

__all__ = ["T2TLayer", "T2TViT", "TokensToToken", "sinusoid_table", "soft_split_size", "split_sizes"]

# (kernel, stride, padding) of the three soft splits (paper, section 3.2)
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
SplitsT = tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]
REDUCTION = math.prod(s for _, s, _ in SOFT_SPLITS)  # 16: input pixels per token side
POOLS = ("token", "avg", "max", "avgmax", "")


def _factory(device: Any, dtype: Any) -> dict:
    """device/dtype kwargs for layer constructors, only those given."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the token grid after one soft split (the paper's eq. 3, as nn.Unfold computes it)."""
    return (size + 2 * padding - kernel) // stride + 1


def split_sizes(h: int, w: int, splits: SplitsT = SOFT_SPLITS) -> list[tuple[int, int]]:
    """[(h, w) of the input, then of the token grid after each of the three soft splits]."""
    # `splits` is an argument (not the global read inside) so that TorchScript can compile this
    sizes = [(h, w)]
    for k, s, p in splits:
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

    def __init__(self, in_dim: int, token_dim: int, mlp_ratio: float = 1.0, qkv_bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = _factory(device, dtype)
        self.norm1 = nn.LayerNorm(in_dim, **dd)
        self.qkv = nn.Linear(in_dim, 3 * token_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(token_dim, token_dim, **dd)
        self.norm2 = nn.LayerNorm(token_dim, **dd)
        self.mlp = Mlp(token_dim, int(token_dim * mlp_ratio), **dd)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        # one head, as (B, 1, N, token_dim): the same attention as on (B, N, token_dim), in the 4-D
        # layout that torch's ONNX exporter takes (it refuses 3-D query, key and value)
        attn = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        x = v + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T module: (B, C, H, W) image -> (B, N, embed_dim) tokens, N = h * w of the final grid.

    `grid` is the final token grid for img_size (see the module docstring for the split sizes); the
    forward takes any input size (the grid follows it). With gradient checkpointing the two T2T
    layers (attention over (H/4 * W/4) and (H/8 * W/8) tokens, the largest activations of the model)
    are recomputed in the backward pass.
    """

    def __init__(self, img_size: tuple[int, int], in_chans: int = 3, token_dim: int = 64, embed_dim: int = 384,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = _factory(device, dtype)
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(k2, stride=s2, padding=p2)
        self.attention1 = T2TLayer(in_chans * k0 * k0, token_dim, **dd)
        self.attention2 = T2TLayer(token_dim * k1 * k1, token_dim, **dd)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim, **dd)
        self.grad_checkpointing = False
        self.set_input_size(img_size)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """The nominal input size: sets `sizes`, `grid` and `num_patches` (the layers take any size)."""
        self.img_size = to_2tuple(img_size)
        self.sizes = split_sizes(*self.img_size)
        self.grid = self.sizes[-1]
        self.num_patches = self.grid[0] * self.grid[1]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @staticmethod
    def _reconstruct(tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, h*w, C) tokens -> (B, C, h, w) image, so that the next soft split sees neighbours."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], size[0], size[1])

    def forward(self, x: Tensor) -> Tensor:
        sizes = split_sizes(x.shape[-2], x.shape[-1])
        x = self.soft_split0(x).transpose(1, 2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(self.attention1, x)
            x = checkpoint(self.attention2, self.soft_split1(self._reconstruct(x, sizes[1])).transpose(1, 2))
        else:
            x = self.attention1(x)
            x = self.attention2(self.soft_split1(self._reconstruct(x, sizes[1])).transpose(1, 2))
        return self.project(self.soft_split2(self._reconstruct(x, sizes[2])).transpose(1, 2))


class T2TViT(nn.Module):
    """T2T-ViT classifier with timm's ViT interface. forward: (B, C, H, W) -> (B, num_classes).

    Args:
        img_size: input size (int or (H, W)); it fixes the token grid and the position table
            (32 -> a 2x2 grid). Default 224.
        token_dim: width of the T2T layers (64 in the paper).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT backbone of timm `Block`s.
        global_pool: "token" (class token, the paper's), "avg", "max", "avgmax" (over the patch
            tokens) or "" (forward_head returns the tokens).
        learned_pos: learn the position embedding instead of the paper's fixed sinusoid.
        distilled: add a distillation token and head (see the module docstring); needs
            global_pool "token".
        dynamic_img_size: take any input size, resampling the position embedding to its token
            grid at every forward (as timm's ViT with dynamic_img_size); otherwise another input
            size is an error.
        drop_rate, pos_drop_rate, attn_drop_rate, proj_drop_rate, drop_path_rate: dropout rates
            (drop_path linearly increasing over the blocks, as in DeiT).
        device, dtype: where and in which dtype to create the parameters (timm's factory kwargs).
    """

    dynamic_img_size: Final[bool]
    distilled: Final[bool]

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", token_dim: int = 64, embed_dim: int = 384, depth: int = 14,
                 num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False, learned_pos: bool = False,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, dynamic_img_size: bool = False,
                 distilled: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        _check_pool(global_pool, distilled)
        dd = _factory(device, dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.distilled = distilled
        self.distilled_training = False  # set_distilled_training(True): forward gives (class, dist) in training
        self.num_prefix_tokens = 2 if distilled else 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.tokens_to_token = TokensToToken(to_2tuple(img_size), in_chans, token_dim, embed_dim, **dd)
        self.num_patches = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if distilled else None
        table = sinusoid_table(1 + self.num_patches, embed_dim)
        table = table.to(**dd) if dd else table
        if learned_pos:
            self.pos_embed = nn.Parameter(table)
        else:
            # The paper's fixed table: a buffer, so that no optimizer, no gradient check and no
            # weight-decay list sees it; the state dict keeps the usual `pos_embed` (1, 1 + N, embed_dim).
            self.register_buffer("pos_embed", table)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # Identity, kept for timm's interface: kdkit's `token` head inserts its distillation token
        # through a forward pre-hook here, after the position embedding and before the blocks.
        self.patch_drop = nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as in DeiT
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=nn.LayerNorm, **dd)
            for i in range(depth)])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=REDUCTION) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()) \
            if distilled else None
        trunc_normal_(self.cls_token, std=0.02)
        if distilled:
            trunc_normal_(self.dist_token, std=0.02)
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
        """The class (and distillation) token, and the position embedding when it is learned."""
        return ({"cls_token"} | ({"dist_token"} if self.distilled else set())
                | ({"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay: embedding (T2T module, tokens), each block, norm."""
        return dict(stem=r"^cls_token|^dist_token|^pos_embed|^tokens_to_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block (and the two T2T layers) in the backward pass instead of storing
        their activations."""
        self.grad_checkpointing = enable
        self.tokens_to_token.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's switch of distilled models: in training, forward returns (class, dist) logits."""
        if not self.distilled:
            raise ValueError("set_distilled_training needs a distilled T2T-ViT (distilled=True)")
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module | tuple[nn.Module, nn.Module]:
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier (none with num_classes=0; both heads of a distilled model) on the model's
        device and dtype, in its mode; the pooling is kept unless `global_pool` is given."""
        self.num_classes = num_classes
        if global_pool is not None:
            _check_pool(global_pool, self.distilled)
            self.global_pool = global_pool
        ref = self.cls_token
        for name in ("head", "head_dist") if self.distilled else ("head",):
            head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0
                    else nn.Identity())
            head.train(self.training)
            setattr(self, name, head)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None) -> None:
        """Rebuild for another input size: the token grid, and the position embedding resampled to it
        (bicubic over the grid, as timm's ViT; fixed or learned alike, trainable as before)."""
        if img_size is None:
            return
        old_grid = self.tokens_to_token.grid
        self.tokens_to_token.set_input_size(img_size)
        self.num_patches = self.tokens_to_token.num_patches
        with torch.no_grad():
            table = resample_abs_pos_embed(self.pos_embed, new_size=list(self.tokens_to_token.grid),
                                           old_size=list(old_grid), num_prefix_tokens=1)
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        else:
            self.pos_embed = table
        try:  # timm >= 1.0.31 records the size the model now takes (export, rebuilding)
            from timm.models._input import update_model_input_size
        except ImportError:
            return
        update_model_input_size(self, self.tokens_to_token.img_size)

    def _embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_prefix_tokens + N, embed_dim): T2T tokens, class token, position
        embedding, then the distillation token of a distilled model after the class token."""
        h, w = x.shape[-2], x.shape[-1]
        x = self.tokens_to_token(x)
        if self.dynamic_img_size:
            grid = split_sizes(h, w)[-1]
            pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=[grid[0], grid[1]],
                                               old_size=[self.tokens_to_token.grid[0], self.tokens_to_token.grid[1]],
                                               num_prefix_tokens=1)
        else:
            torch._assert(x.shape[1] == self.num_patches,
                          f"a {h}x{w} input gives {x.shape[1]} tokens, the model was built for {self.num_patches} "
                          f"(img_size {self.tokens_to_token.img_size[0]}x{self.tokens_to_token.img_size[1]}): "
                          "build it at this size, call set_input_size, or pass dynamic_img_size=True")
            pos_embed = self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x + pos_embed.to(x.dtype))
        if self.distilled:
            x = torch.cat([x[:, :1], self.dist_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return self.patch_drop(x)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The outputs of the blocks at `indices` (an int n: the last n; None: all; negative from
        the end) and the final features.

        Each intermediate holds the patch tokens only: (B, embed_dim, h, w) with output_fmt "NCHW",
        (B, h * w, embed_dim) with "NLC" ((h, w): the token grid of this input); with
        return_prefix_tokens each is (tokens, prefix tokens (B, num_prefix_tokens, embed_dim)),
        not under TorchScript. norm: pass each through the final norm. stop_early: run the blocks
        only up to the last index asked for (the final features are then that block's, normed).
        Returns (final (B, num_prefix_tokens + N, embed_dim), intermediates), or the intermediates
        alone with intermediates_only.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', not {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, grid = x.shape[0], split_sizes(x.shape[-2], x.shape[-1])[-1]
        x = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # a Sequential cannot be sliced in TorchScript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (the final norm with prune_norm, the classifier
        and pooling with prune_head); returns the absolute indices for forward_intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_prefix_tokens + N, embed_dim), after the final norm."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, T, embed_dim) features -> (B, num_classes) logits, or (B, embed_dim) with pre_logits
        (the tokens themselves with global_pool ""). A distilled model reads its class and
        distillation tokens, as timm's VisionTransformerDistilled: (class, dist) logits in distilled
        training, their average otherwise (pre_logits: the average of the two tokens)."""
        if self.distilled:
            x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if self.distilled_training and self.training and not torch.jit.is_scripting():
                return x, x_dist
            return (x + x_dist) / 2
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=self.num_prefix_tokens)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str, distilled: bool = False) -> None:
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be one of {POOLS}, not {global_pool!r}")
    if distilled and global_pool != "token":
        raise ValueError(f"a distilled T2T-ViT reads its class and distillation tokens: global_pool 'token', "
                         f"not {global_pool!r}")


def _cfg(**kwargs: Any) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "tokens_to_token.attention1.qkv", "classifier": "head",
            **kwargs}


default_cfgs = generate_default_cfgs({"t2t_vit_7.untrained": _cfg(), "t2t_vit_12.untrained": _cfg(),
                                      "t2t_vit_14.untrained": _cfg()})


def checkpoint_filter_fn(state_dict: dict, model: T2TViT) -> dict:
    """timm's pretrained filter for a checkpoint of another image size: a learned position table is
    resampled as timm resamples a ViT's (class token's row kept), the fixed sinusoidal one is the
    model's own (a function of the grid)."""
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = (resample_abs_pos_embed(pos, new_size=list(model.tokens_to_token.grid),
                                                          num_prefix_tokens=1)
                                   if isinstance(model.pos_embed, nn.Parameter) else model.pos_embed.clone())
    return state_dict


def _create(variant: str, pretrained: bool, defaults: dict, kwargs: dict) -> T2TViT:
    # features_only=True: timm's FeatureGetterNet over forward_intermediates, the last 3 blocks by default
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(T2TViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **{**defaults, **kwargs})


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7: embed 256, depth 7, 4 heads, mlp_ratio 2 (4.3M params at 1000 classes)."""
    return _create("t2t_vit_7", pretrained, dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0), kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12: embed 256, depth 12, 4 heads, mlp_ratio 2 (6.9M params at 1000 classes)."""
    return _create("t2t_vit_12", pretrained, dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0), kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14: embed 384, depth 14, 6 heads, mlp_ratio 3 (21.5M params at 1000 classes)."""
    return _create("t2t_vit_14", pretrained, dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0), kwargs)

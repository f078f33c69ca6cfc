"""Feature distillation: the student's features matched to the teacher's through learned projections,
on top of a logit loss.

    loss = logit_loss(out, Zt, y) + feature_weight * MSE(P(f_s), f_t)
                                  [+ token_weight * MSE(Q(T_s), pool(M_t))]

f_s (B, D_s), f_t (B, D_t): the pooled pre-logit features (timm's forward_head(pre_logits=True)) of
student and teacher; P: a learned linear projection D_s -> D_t (as timm's FeatureDistillationTask
and FitNets' regressor, Romero et al., 2015). With `tokens`, a ViT student's patch tokens T_s
(B, N, D_s), N = h * w, are matched as well to a ConvNet teacher's spatial map M_t (B, C, H, W)
average-pooled to the token grid (h, w), through a learned Q: D_s -> C. MSE is the mean over all
elements. The projections are trained with the student (they live in its head as adapters, so
data parallelism syncs them) and are not part of the saved student. The teacher must run live:
features are not cached.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.losses.distillation import LOSSES, DistillationLoss
from kdkit.registry import KdkitError
from kdkit.types import StudentOut, TeacherOut


class Projection(nn.Module):
    """Adapter: StudentOut -> a linear map D_s -> D_t of its pooled `features` (B, D_s) -> (B, D_t),
    or of each of its patch `tokens` (B, N, D_s) -> (B, N, D_t)."""

    _MISSING = {"features": "feature distillation needs the head's pooled features: use head token, dual, "
                            "shared or native on a timm model",
                "tokens": "loss 'feature' with tokens = true needs a ViT student (patch tokens)"}

    def __init__(self, student_features: int, teacher_features: int, source: str = "features"):
        super().__init__()
        self.source = source
        self.proj = nn.Linear(student_features, teacher_features)

    def forward(self, out: StudentOut) -> Tensor:
        x = getattr(out, self.source)
        if x is None:
            raise KdkitError(self._MISSING[self.source])
        return self.proj(x)


@LOSSES.register("feature")
class FeatureDistillationLoss(DistillationLoss):
    """See the module docstring. `logit_loss` names the logit loss underneath ("soft", "hard", "dkd",
    ..., or "none" for labels + features only), built with the shared loss settings; its terms are
    logged with "feature" (and "tokens")."""

    needs_features = True

    def __init__(self, student_features: int, teacher_features: int, logit_loss: str = "soft",
                 feature_weight: float = 1.0, tokens: bool = False, token_weight: float = 1.0,
                 task_weight: float = 0.5, kd_weight: float = 0.5, tau: float = 1.0, kl_reduction: str = "batchmean",
                 hard_smoothing: float = 0.0, label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        if logit_loss == "feature" or LOSSES.get(logit_loss).needs_features or LOSSES.get(logit_loss).needs_epoch:
            raise KdkitError("loss 'feature': logit_loss must be a logit loss (soft, hard, dkd, dist, mlkd, none)")
        if feature_weight < 0 or token_weight < 0:
            raise KdkitError("loss 'feature': feature_weight and token_weight must be >= 0")
        shared = dict(task_weight=task_weight, kd_weight=kd_weight, tau=tau, kl_reduction=kl_reduction,
                      hard_smoothing=hard_smoothing, label_smoothing=label_smoothing, standardize=standardize)
        self.logits = LOSSES.create(logit_loss, None, **shared)
        self.logit_loss, self.feature_weight = logit_loss, float(feature_weight)
        self.tokens, self.token_weight = bool(tokens), float(token_weight)
        self.student_features, self.teacher_features = int(student_features), int(teacher_features)

    def student_adapters(self) -> dict[str, nn.Module]:
        adapters = {"features": Projection(self.student_features, self.teacher_features)}
        if self.tokens:
            adapters["tokens"] = Projection(self.student_features, self.teacher_features, "tokens")
        return adapters

    def forward(self, out: StudentOut, teacher: TeacherOut | None, target: Tensor) -> dict[str, Tensor]:
        if not isinstance(teacher, TeacherOut):
            raise KdkitError("loss 'feature' needs the teacher's features (a live teacher; features are not cached)")
        if "features" not in out.adapted:
            raise KdkitError("loss 'feature': the student carries no feature projection (attach the loss's "
                             "student_adapters() to its head: kdkit.engine.build.attach_adapters)")
        terms = self.logits(out, teacher.logits, target)
        feature = F.mse_loss(out.adapted["features"].float(), teacher.features)
        loss = terms["loss"] + self.feature_weight * feature
        terms["feature"] = feature.detach()
        if self.tokens:
            tokens = token_loss(out.adapted["tokens"].float(), teacher.spatial)
            loss = loss + self.token_weight * tokens
            terms["tokens"] = tokens.detach()
        terms["loss"] = loss
        return terms


def token_loss(tokens: Tensor, spatial: Tensor) -> Tensor:
    """MSE between projected patch tokens (B, N, C) and a teacher map (B, C, H, W) average-pooled to
    the square token grid (sqrt(N), sqrt(N)), row-major as a ViT orders its patches."""
    if spatial.ndim != 4:
        raise KdkitError("loss 'feature' with tokens = true needs a ConvNet teacher (a (B, C, H, W) feature map)")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise KdkitError(f"loss 'feature' tokens: {tokens.shape[1]} patch tokens are not a square grid")
    target = F.adaptive_avg_pool2d(spatial, (side, side)).flatten(2).transpose(1, 2)  # (B, N, C)
    return F.mse_loss(tokens, target)

"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

DIST replaces KD's exact match of probabilities by a match of relations, Pearson correlation, so
that a student need not reproduce a much stronger teacher's scale. With Y = softmax(Z / tau) for
student and teacher, both (B, K):

    inter = 1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :])    each sample's class ranking (over K)
    intra = 1 - (1/K) sum_j rho(Y_s[:, j], Y_t[:, j])    each class's spread over the batch (over B)
    DIST  = tau^2 * (beta * inter + gamma * intra)

rho is Pearson's correlation computed as the reference code does (hunto/image_classification_sota,
lib/models/losses/dist_kd.py): the cosine similarity of the centred vectors with eps = 1e-8 added
to the product of their norms, rho(a, b) = <a', b'> / (||a'|| * ||b'|| + eps), a' = a - mean(a).
The eps keeps a constant vector (rho = 0/0) at rho = 0 instead of NaN. The reference code
multiplies each term by tau^2, as here. Its settings: beta = gamma = 1 with an overall loss weight
of 2 next to CE weight 1, tau = 1 on ImageNet (configs/strategies/distill/resnet_dist.yaml) and
tau = 4 on CIFAR-100 (dist_cifar.yaml).

`intra` is a batch-level term: every class's correlation runs over the whole batch, so it has no
per-sample decomposition (it cannot be masked or weighted per sample, it changes with the batch
size, and with B = 1 it is the constant 1: a single value has no spread to correlate). Only
`inter` decomposes, see `dist_inter_per_sample`.
"""

from __future__ import annotations

from torch import Tensor

from kdkit.losses.distillation import LOSSES, DistillationLoss, _wide, check_loss_settings
from kdkit.registry import KdkitError

PEARSON_EPS = 1e-8  # the reference code's


def pearson(x: Tensor, y: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of every row of x with the same row of y, (N,) from (N, D) inputs:
    <x', y'> / (||x'|| * ||y'|| + eps) with x' = x - mean over the row. A constant row x gives 0,
    and there the gradient is y' / (0 + eps): finite but large, since correlation ignores scale
    and is most sensitive where the spread is smallest. Computed in float32 at least."""
    x, y = _wide(x, y)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def _probs(student: Tensor, teacher: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    if not tau > 0:
        raise KdkitError(f"tau must be > 0, got {tau}")
    if student.ndim != 2 or student.shape != teacher.shape:
        raise KdkitError(f"DIST needs student and teacher logits of one shape (B, K), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    student, teacher = _wide(student, teacher)
    return (student / tau).softmax(dim=1), (teacher / tau).softmax(dim=1)


def dist_inter_per_sample(student: Tensor, teacher: Tensor, tau: float = 1.0,
                          eps: float = PEARSON_EPS) -> Tensor:
    """The inter-class term of every sample, (B,): 1 - rho(Y_s[i, :], Y_t[i, :]), in [0, 2], without
    the tau^2 factor; its batch mean is `dist_terms(...)[0]`. student, teacher: (B, K) logits;
    float32 at least (float64 stays float64)."""
    y_s, y_t = _probs(student, teacher, tau)
    return 1.0 - pearson(y_s, y_t, eps)


def dist_terms(student: Tensor, teacher: Tensor, tau: float = 1.0,
               eps: float = PEARSON_EPS) -> tuple[Tensor, Tensor]:
    """(inter, intra), two scalars in [0, 2], without the tau^2 factor. student, teacher: (B, K)
    logits; Y = softmax(Z / tau). inter = 1 - mean over samples of the correlation over classes;
    intra = 1 - mean over classes of the correlation over the batch (a batch-level term, no
    per-sample form; 1 when B = 1). Float32 at least (float64 stays float64)."""
    y_s, y_t = _probs(student, teacher, tau)
    inter = 1.0 - pearson(y_s, y_t, eps).mean()
    intra = 1.0 - pearson(y_s.t(), y_t.t(), eps).mean()
    return inter, intra


def dist_loss(student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
              eps: float = PEARSON_EPS) -> Tensor:
    """DIST, a scalar: tau^2 * (beta * inter + gamma * intra), inter and intra from `dist_terms`.

    student, teacher: (B, K) logits of any float dtype; the result is float32 at least. beta
    weighs the inter-class (per-sample) relation, gamma the intra-class (batch) relation;
    defaults 1, 1 and tau = 1 as the reference code's DIST (which then weighs the whole term by 2
    on ImageNet). It needs no label, so labeled and unlabeled samples are treated alike.
    """
    inter, intra = dist_terms(student, teacher, tau, eps)
    return (tau * tau) * (beta * inter + gamma * intra)


@LOSSES.register("dist")
class DISTLoss(DistillationLoss):
    """task_weight * CE(psi(Zs), y) + kd_weight * tau^2 * (beta * inter + gamma * intra) on the
    distillation head (module docstring; Huang et al., NeurIPS 2022). The paper's ImageNet setting
    is task_weight 1, kd_weight 2, beta = gamma = 1, tau 1. A term of the whole batch (`intra`):
    with unlabeled images it is computed over the samples that count (labeled + kept unlabeled).
    """

    per_sample = False

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, task_weight: float = 0.5, kd_weight: float = 0.5,
                 tau: float = 1.0, label_smoothing: float = 0.0, standardize: bool = False):
        super().__init__(task_weight, kd_weight, label_smoothing, standardize)
        if beta < 0 or gamma < 0:
            raise KdkitError(f"dist beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        check_loss_settings(tau=tau)
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def distill(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return dist_loss(student, teacher, self.beta, self.gamma, self.tau)

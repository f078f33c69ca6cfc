"""Property-based tests (hypothesis): the losses stay finite, with a non-negative KL and finite
gradients, for extreme logits in float32, float16 and bfloat16; the recipe parser either builds a
recipe or raises KdkitError, and valid recipes survive a round trip through TOML."""

import os
import string

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kdkit.config import Recipe, load_recipe, parse_override
from kdkit.losses import HardDistillationLoss, SoftDistillationLoss, TaskLoss, hard_kd, soft_kd, task_ce
from kdkit.registry import KdkitError
from kdkit.types import StudentOut

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# a modest number of examples per test keeps the file at ~10 s; KDKIT_HYPOTHESIS_EXAMPLES=1000 searches harder
FAST = settings(max_examples=int(os.environ.get("KDKIT_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def logits(draw, extreme: float = 1e4, n: int = 1):
    """`n` (B, K) logit tensors mixing ordinary values with +-`extreme`, and a dtype for them."""
    b, k = draw(st.integers(1, 4)), draw(st.integers(2, 7))
    value = st.one_of(st.floats(-30, 30), st.sampled_from([-extreme, extreme, 0.0]))
    matrix = st.lists(st.lists(value, min_size=k, max_size=k), min_size=b, max_size=b)
    return [torch.tensor(draw(matrix)) for _ in range(n)], draw(st.sampled_from(DTYPES))


def _grad(fn, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(dtype).requires_grad_(True)
    value = fn(x)
    value.backward()
    return value.detach().float(), x.grad.float()


@FAST
@given(logits(n=2), st.floats(0.5, 8.0), st.sampled_from(["batchmean", "deit"]))
@example(([torch.tensor([[0.0, 17.0]]), torch.tensor([[0.0, 16.0]])], torch.float32), 1.0, "batchmean")
def test_soft_kd_is_finite_non_negative_with_finite_gradients(pair, tau, reduction):
    (s, t), dtype = pair
    value, grad = _grad(lambda x: soft_kd(x, t.to(dtype), tau, reduction), s, dtype)
    # KL >= 0 up to float32's rounding of each log-softmax, whose absolute error grows with the
    # logits' size (x/tau - logsumexp(x/tau)): e.g. s (0, 17), t (0, 16), tau 1 gives -6.7e-9
    k, big = s.shape[1], max(s.to(dtype).abs().max().item(), t.to(dtype).abs().max().item())
    rounding = 4 * torch.finfo(torch.float32).eps * tau * tau * k * (1 + big / tau)
    assert torch.isfinite(value) and value >= -rounding
    assert torch.isfinite(grad).all()


@FAST
@given(logits(), st.floats(0.5, 8.0))
def test_soft_kd_of_identical_logits_is_zero(student, tau):
    (s,), dtype = student
    value = soft_kd(s.to(dtype), s.to(dtype), tau)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


@FAST
@given(logits(n=2), st.floats(0.0, 0.5))
def test_hard_kd_is_finite_non_negative_with_finite_gradients(pair, smoothing):
    (s, t), dtype = pair
    value, grad = _grad(lambda x: hard_kd(x, t.to(dtype), smoothing), s, dtype)
    assert torch.isfinite(value) and value >= 0
    assert torch.isfinite(grad).all()


@FAST
@given(logits(), st.data(), st.floats(0.0, 0.5))
def test_task_ce_is_finite_for_labels_soft_targets_and_unlabeled(student, data, smoothing):
    (s,), dtype = student
    b, k = s.shape
    labels = torch.tensor(data.draw(st.lists(st.integers(-1, k - 1), min_size=b, max_size=b)))
    soft = torch.softmax(torch.randn(b, k), 1) * (labels >= 0)[:, None]
    for target in (labels, soft):
        value, grad = _grad(lambda x, target=target: task_ce(x, target, smoothing), s, dtype)
        assert torch.isfinite(value) and value >= 0
        assert torch.isfinite(grad).all()


@FAST
@given(logits(), st.sampled_from(["none", "soft", "hard"]), st.floats(0, 1), st.floats(0, 1), st.floats(0.5, 8))
def test_loss_classes_give_finite_terms_and_gradients(student, kind, task_weight, kd_weight, tau):
    (s,), dtype = student
    b, k = s.shape
    loss = {"none": TaskLoss(), "soft": SoftDistillationLoss(task_weight, kd_weight, tau),
            "hard": HardDistillationLoss(task_weight, kd_weight, hard_smoothing=0.1)}[kind]
    x = s.to(dtype).requires_grad_(True)
    dist = x.flip(1)
    terms = loss(StudentOut(x, dist), torch.randn(b, k) * 1e4, torch.randint(0, k, (b,)))
    terms["loss"].backward()
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())
    assert torch.isfinite(x.grad).all()


# --- recipes -----------------------------------------------------------------------------------------

KEYS = [f"{section}.{key}" for section, values in Recipe().to_dict().items() if isinstance(values, dict)
        for key in values] + ["preset", "description"]
TOML_VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.text(max_size=12), st.lists(st.floats(0, 1), max_size=3))


@FAST
@given(st.text(max_size=40))
def test_any_override_string_parses_or_is_a_kdkit_error(item):
    try:
        load_recipe(None, [item])
    except KdkitError:
        pass


@FAST
@given(st.sampled_from(KEYS), st.one_of(TOML_VALUES, st.text(alphabet=string.printable, max_size=20)))
def test_known_keys_with_any_value_build_or_are_a_kdkit_error(key, value):
    try:
        load_recipe(None, {key.split(".")[0]: {key.split(".")[1]: value}} if "." in key else {key: value})
    except KdkitError:
        pass


@st.composite
def valid_settings(draw) -> dict:
    """Overrides of keys with values of their own type (checked values stay in range)."""
    text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
    name = st.text(alphabet=string.ascii_letters + string.digits + " -.+_/", max_size=12)
    # a run name is "" (the default) or one folder name (a path is refused: test_outputs.py)
    run_name = st.one_of(st.just(""), text.filter(
        lambda s: s.strip() and s not in (".", "..") and not any(c in s for c in "/\\\0")))
    kwargs = st.dictionaries(st.one_of(name, text), st.one_of(st.integers(-99, 99), st.booleans(), text,
                                                              st.floats(-1e6, 1e6)), max_size=3)
    return {
        "description": draw(text),
        "model": {"student": draw(name), "kwargs": draw(kwargs), "drop_path": draw(st.floats(0, 1, exclude_max=True)),
                  "img_size": draw(st.one_of(st.none(), st.integers(1, 1024)))},
        "data": {"batch_size": draw(st.integers(1, 4096)), "strict": draw(st.booleans()), "path": draw(text)},
        "aug": {"scale": draw(st.tuples(st.floats(0, 1), st.floats(0, 1))), "auto_augment": draw(text)},
        "loss": {"kind": draw(st.sampled_from(["none", "soft", "hard"])), "tau": draw(st.floats(0.01, 100)),
                 "kd_weight": draw(st.floats(0, 1)), "hard_smoothing": draw(st.floats(0, 0.99))},
        "optim": {"lr": draw(st.floats(1e-12, 10)), "epochs": draw(st.integers(0, 10**6)),
                  "ema_decay": draw(st.floats(0, 0.999999))},
        "run": {"seed": draw(st.integers(-2**62, 2**62)), "name": draw(run_name), "on_nonfinite": draw(
            st.sampled_from(["stop", "skip"])), "keep_checkpoints": draw(st.integers(0, 100))},
    }


@FAST
@given(valid_settings())
def test_valid_recipes_round_trip_through_toml(tmp_path_factory, settings_):
    recipe = load_recipe(None, settings_)
    path = tmp_path_factory.mktemp("r") / "recipe.toml"
    path.write_text(recipe.to_toml())
    assert load_recipe(path) == recipe


@FAST
@given(st.sampled_from(["optim.lr", "run.seed", "data.batch_size", "loss.tau", "aug.hflip"]),
       st.one_of(st.integers(1, 10**6), st.floats(0.01, 1e6)))
def test_override_strings_set_the_value(key, value):
    section, name = key.split(".")
    try:
        recipe = load_recipe(None, [f"{key}={value!r}"])
    except KdkitError:
        assert isinstance(value, float) and name in ("seed", "batch_size")  # a float for an int key
        return
    assert getattr(getattr(recipe, section), name) == value
    assert parse_override(f"{key}={value!r}") == {section: {name: value}}

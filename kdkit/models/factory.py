"""Model factories: timm models with kdkit's short names and clear errors, students wrapped in a head
strategy, frozen teachers, and saved students rebuilt for inference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from torch import Tensor, nn

from kdkit.models.names import resolve_model_name
from kdkit.models.pretrained import init_distillation, load_pretrained
from kdkit.models.saved import head_of, load_student_weights, read_config
from kdkit.models.selection import HUB_HINT, init_from_larger
from kdkit.models.student import HEADS, wrap_student
from kdkit.models.teacher import Teacher
from kdkit.network import require_hub
from kdkit.registry import KdkitError


def create_model(name: str, num_classes: int | None = None, pretrained: bool = False,
                 img_size: int | None = None, patch_size: int | None = None, **kwargs: object) -> nn.Module:
    """timm.create_model with kdkit's short names and clear errors.

    img_size / patch_size are passed only when given; img_size is dropped for models that take any
    size (ConvNets), and a patch_size the model does not take is an error that says so. Pretrained
    weights come from the Hub (offline: a clear error in seconds), or from a local file or state
    dict through timm's overlay, `pretrained_cfg_overlay=dict(file=PATH)`, which needs no network.
    """
    full = resolve_model_name(name)
    hub = pretrained and not _local_weights(kwargs.get("pretrained_cfg_overlay"))
    if hub:
        check_weights_reachable(full)
    extra = {k: v for k, v in dict(img_size=img_size, patch_size=patch_size).items() if v is not None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        try:
            return timm.create_model(full, pretrained=pretrained, **extra, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            # ConvNets take any input size: img_size then only sets the data pipeline's size.
            extra.pop("img_size")
            return timm.create_model(full, pretrained=pretrained, **extra, **kwargs)
    except TypeError as e:
        raise KdkitError(f"model {full!r} does not accept these options ({e}); "
                         f"drop --img-size/--patch-size or the model kwargs") from None
    except (OSError, RuntimeError, ValueError) as e:
        if hub and "No pretrained weights exist" in str(e):
            here = Path(__file__).resolve().parent.parent / "assets" / "teachers" / full  # the installed package's
            bundled = f" (the bundled one: {here})" if here.is_dir() else ""
            raise KdkitError(f"{full!r} has no pretrained weights on the hub: pass local weights with "
                             f"--teacher-weights FILE (or --student-weights FILE){bundled}") from None
        if hub and not isinstance(e, RuntimeError):
            raise KdkitError(f"could not download pretrained weights for {full!r} ({type(e).__name__}: "
                             f"{str(e)[:200]}). Without internet pass a local file with --pretrained-path "
                             f"(a student) or --teacher-weights.") from None
        raise


def _local_weights(overlay: dict | None) -> bool:
    """Whether timm's `pretrained_cfg_overlay` names a local file or state dict, which timm loads
    before (instead of) the Hub's weights."""
    return bool(overlay) and (bool(overlay.get("file")) or overlay.get("state_dict") is not None)


def check_weights_reachable(name: str, fix: str = "") -> None:
    """Fail in seconds, with one line, when timm would download `name`'s pretrained weights and the
    Hub cannot be reached (or HF_HUB_OFFLINE is set); weights already in the local cache pass.
    `fix`: the local route to name in that line (default: --teacher-weights / --pretrained-path)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return
    if cfg is None:
        return
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in (cfg.hf_hub_filename or "open_clip_pytorch_model.bin", "model.safetensors",
                         "pytorch_model.bin")):
            return
    elif cfg.url:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file():
            return
    else:
        return  # no weights anywhere: timm says so, and create_model turns it into one line
    require_hub(f"downloading the pretrained weights of {name!r}",
                fix or "without internet pass a local file: --teacher-weights FILE for a teacher, "
                "--pretrained-path FILE for a student")


def hub_state_dict(name: str, fix: str = HUB_HINT) -> dict[str, Tensor]:
    """The state dict of timm's pretrained `name` (from the Hub or its local cache; offline, one line
    with `fix`), built under a forked RNG so that loading it leaves the caller's random stream as it was."""
    check_weights_reachable(name, fix)
    with torch.random.fork_rng(devices=[]):
        model = create_model(name, pretrained=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model`: safetensors, or a timm/PyTorch checkpoint read with
    weights_only=True (nothing is unpickled). Class-count mismatches are a clear error."""
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise KdkitError(f"the weights file {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        timm.models.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())  # torch's message spans lines: one line for the user
        hint = " (the checkpoint's class count differs from the data's?)" if "size mismatch" in msg else ""
        raise KdkitError(f"cannot load {path} into {type(model).__name__}{hint}: {msg[:600]}") from None
    except Exception as e:  # unreadable, truncated or non-weights file
        raise KdkitError(f"cannot read weights from {path}: {type(e).__name__}: {str(e)[:300]}") from None


def model_data_config(model: nn.Module) -> dict:
    """mean, std, input_size and interpolation from the model's timm pretrained config."""
    return resolve_data_config({}, model=model)


def create_student(model: str | nn.Module, num_classes: int, head: str = "auto", *, pretrained: bool = False,
                   weights: str | Path | None = None, img_size: int | None = None,
                   patch_size: int | None = None, drop_path_rate: float = 0.0,
                   model_kwargs: dict | None = None, head_args: dict | None = None,
                   pretrained_path: str | Path | None = None, init_from: str | Path | None = None,
                   init_from_layers: str = "first", report: Callable[[str], object] | None = None) -> nn.Module:
    """A student wrapped in its head strategy (`head_args`: the head's own settings); forward returns StudentOut.

    `model` is a timm name (or kdkit short name) or any nn.Module classifier. `pretrained`: timm's
    Hub weights. `pretrained_path`: a local timm or DeiT checkpoint of any class count, image or
    patch size, with or without a distillation token, loaded with adaptation (models/pretrained.py);
    `report` receives its one-line record. With either, the parameters the head adds (an inserted
    distillation token, a `head_dist`) start from the pretrained class token and head. `weights`
    then loads, strictly, a kdkit run's student.safetensors (head included) or a checkpoint of
    exactly this student (timm's --initial-checkpoint). `init_from`: weight selection from a larger
    pretrained model of the same family (a timm name, a local weights file or a kdkit student
    folder; `init_from_layers` "first" or "uniform", models/selection.py); the classifier keeps its
    random init, and `report` receives the record's line.
    """
    if init_from and (pretrained or pretrained_path or weights is not None):
        given = "--pretrained" if pretrained else "--pretrained-path" if pretrained_path else "--student-weights"
        raise KdkitError(f"--init-from selects the student's starting weights from a larger model and {given} loads "
                         f"the student's own: give one of them")
    if isinstance(model, nn.Module):
        if pretrained_path:
            raise KdkitError("pretrained_path needs a timm model name; a module you built carries its own weights")
        selection = init_from_larger(model, init_from, hub_state_dict, init_from_layers) if init_from else None
        student = wrap_student(model, head, head_args)
        if selection is not None:
            _report_selection(student, selection, report)
        return student
    kwargs = dict(model_kwargs or {})
    img_size = img_size or kwargs.pop("img_size", None)
    patch_size = patch_size or kwargs.pop("patch_size", None)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    record = None
    if pretrained_path:
        if "pretrained_cfg_overlay" in kwargs:
            raise KdkitError("give the pretrained file once: --pretrained-path FILE or model.kwargs."
                             "pretrained_cfg_overlay, not both")
        net, record = load_pretrained(lambda k, **kw: create_model(model, k, img_size=img_size, patch_size=patch_size,
                                                                   **kwargs, **kw), pretrained_path, num_classes)
    else:
        net = create_model(model, num_classes, pretrained=pretrained, img_size=img_size, patch_size=patch_size,
                           **kwargs)
    selection = init_from_larger(net, init_from, hub_state_dict, init_from_layers) if init_from else None
    student = wrap_student(net, head, head_args)
    if selection is not None:
        _report_selection(student, selection, report)
    if record is not None:
        record.from_file_distillation, from_class = init_distillation(student, record.extras)
        record.from_class += from_class
        record.unused = [k for k in record.extras if k not in record.from_file_distillation]
        if report is not None:
            report(record.line())
    elif pretrained:
        init_distillation(student, {})
    if weights is not None:
        load_student_weights(student, weights)
    return student


def _report_selection(student: nn.Module, selection, report: Callable[[str], object] | None) -> None:
    """The parameters the head wrapper adds start from the selected class token and (random) class
    head, as after --pretrained; the record's line goes to `report`."""
    selection.from_class += init_distillation(student, {})[1]
    if report is not None:
        report(selection.line())


def create_teacher(model: str | nn.Module, num_classes: int | None = None, *, weights: str | Path | None = None,
                   pretrained: bool | None = None, model_kwargs: dict | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   input_size: tuple[int, int, int] | None = None,
                   amp_dtype: torch.dtype | None = None) -> Teacher:
    """A frozen Teacher from a timm name or any nn.Module.

    With a name and no `weights`, timm's pretrained weights are downloaded (for `regnety_160`, the
    DeiT teacher's). `weights` is a local file (safetensors or a PyTorch/timm checkpoint) or a
    folder saved by kdkit (timm's layout: config.json + model.safetensors), which then also supplies
    the architecture's kwargs and normalisation. mean/std/input_size default to the model's timm
    pretrained config.
    """
    if isinstance(model, nn.Module):
        net = model
    elif weights is not None and _is_model_folder(weights):
        folder = Path(weights) if Path(weights).is_dir() else Path(weights).parent
        try:
            net = timm.create_model(f"local-dir:{folder}", pretrained=True, **(model_kwargs or {}))
        except Exception as e:
            raise KdkitError(f"cannot load the model saved in {folder}: {type(e).__name__}: {str(e)[:400]}") from None
    else:
        use_hub = weights is None if pretrained is None else pretrained
        net = create_model(model, num_classes if weights is not None else None, pretrained=use_hub,
                           **(model_kwargs or {}))
        if weights is not None:
            load_weights(net, weights)
    if getattr(net, "pretrained_cfg", None) is None:
        # A custom module: unless told otherwise it takes the student's normalisation and size.
        teacher = Teacher(net, mean, std, input_size, amp_dtype=amp_dtype)
    else:
        cfg = model_data_config(net)
        teacher = Teacher(net, mean or cfg["mean"], std or cfg["std"], input_size or cfg["input_size"],
                          amp_dtype=amp_dtype)
    teacher.weights_source = "module" if isinstance(model, nn.Module) else str(weights) if weights else "hub"
    return teacher


def _is_model_folder(path: str | Path) -> bool:
    """A folder in timm's layout (config.json + model.safetensors), or a file inside one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        path.is_dir() or path.name == "model.safetensors")


def saved_head_name(config: dict) -> str:
    """The HEADS name of the head a saved student's config.json records (head_of: older runs
    recorded the class name, e.g. "TokenHead"); KdkitError for a head not registered here."""
    recorded = head_of(config)
    if recorded in HEADS:
        return recorded
    raise KdkitError(f"the saved student's head {recorded!r} is not a registered head (a plugin's? load it with "
                     f"--plugin MODULE). Heads: {', '.join(HEADS.names())}")


def load_saved(weights: str | Path, model: str | None = None,
               num_classes: int | None = None) -> tuple[nn.Module, list[str] | None, dict]:
    """Rebuild a saved student folder (or any timm model + weights file) for inference.

    Returns (module, classes, data_cfg): for a folder with config.json, the student in its saved head
    strategy (forward gives StudentOut) and its saved label_names; otherwise the timm model `model`
    with `weights` loaded (forward gives (B, K) logits; num_classes as given, timm's default when
    None) and classes None. data_cfg is the timm data config (input_size, mean, std, ...) to feed it.
    """
    path = Path(weights)
    if not path.exists():
        raise KdkitError(f"weights not found: {path}")
    cfg = read_config(path) if has_saved_config(path) else {}
    if cfg:
        block = cfg.get("kdkit", {})
        head = saved_head_name(cfg)
        student = create_student(model or cfg["architecture"], cfg["num_classes"], head, weights=None,
                                 model_kwargs=cfg.get("model_args", {}), head_args=block.get("head_args"))
        load_student_weights(student, path)
        classes = cfg.get("label_names")
    else:
        if model is None:
            raise KdkitError(f"no config.json beside {path}: pass --model NAME")
        t = create_teacher(model, num_classes, weights=path)
        student, classes = t.model, None
    dcfg = cfg.get("pretrained_cfg") or model_data_config(student.model if hasattr(student, "model") else student)
    return student, classes, dcfg


def has_saved_config(weights: str | Path) -> bool:
    """Whether `weights` is (or sits in) a saved folder with its config.json."""
    path = Path(weights)
    return (path if path.is_dir() else path.parent).joinpath("config.json").is_file()


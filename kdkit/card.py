"""The model card of a run's student, RUN/student/README.md: a Hugging Face Hub card (YAML front
matter for library_name timm, tags, license and datasets where known, accuracy in a model-index),
then the architecture, the teacher, the data, the loss, the results per head, the resolved recipe,
the command that reproduces the run and how to load the student with plain timm.

Everything comes from the run's own files: student/config.json, summary.json, recipe.toml, the
teacher's weights file (its sha256) or the logit cache it was read from (its manifest), and the
data folder (kdkit.cache.manifest.data_identity, the fingerprint caches record).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData
from safetensors.torch import load_file

from kdkit.files import atomic_write_text
from kdkit.models import load_saved
from kdkit.models.fused import needs_kdkit
from kdkit.models.saved import HEAD_FILE, TWO_HEADED, head_of, is_two_headed, read_config, student_folder
from kdkit.registry import KdkitError

# `kdkit push` rewrites a card that carries this line (and keeps one that does not: your own)
MARKER = "<!-- written by kdkit (kdkit push rewrites this card: delete this line to keep your edits) -->"
HEAD_TEXT = {
    "token": "class token + distillation token (DeiT), each with its linear head",
    "native": "the model's own class and distillation heads (timm's set_distilled_training: LeViT, DeiT distilled)",
    "dual": "two linear heads on the pooled features: class head (labels) and distillation head (teacher)",
    "shared": "one head, the model's own classifier (labels and teacher, if any, through the same head)",
}
LOSS_TEXT = {
    "none": "no distillation: cross-entropy with the labels (both heads, when there are two)",
    "soft": "task_weight · CE(class head, labels) + kd_weight · τ² · KL(softmax(teacher / τ) ‖ softmax(student "
            "/ τ)) on the distillation head; KL reduction `batchmean` = sum / batch, `deit` = sum / (batch · classes)",
    "hard": "task_weight · CE(class head, labels) + kd_weight · CE(distillation head, teacher's argmax) (DeiT's "
            "hard distillation; hard_smoothing smooths the teacher's label)",
}


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write RUN/student/README.md (atomically) from the run's files and return its path.

    run_dir: a finished run directory (recipe.toml, summary.json, student/), or its student folder.
    repo_id: the Hub repository the card is for ("USER/NAME"), used in the loading example.
    """
    folder = student_folder(run_dir)
    return atomic_write_text(folder / "README.md", model_card(folder.parent, repo_id))


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """The card's text (see write_model_card)."""
    run_dir = Path(run_dir)
    folder = student_folder(run_dir)
    missing = [n for n in ("summary.json", "recipe.toml") if not (run_dir / n).is_file()]
    if missing:
        raise KdkitError(f"{run_dir} is not a finished kdkit run (no {' or '.join(missing)}): a model card needs "
                         f"the run's summary.json and recipe.toml")
    config = read_config(folder)
    summary = json.loads((run_dir / "summary.json").read_text())
    recipe_text = (run_dir / "recipe.toml").read_text()
    recipe = tomllib.loads(recipe_text)
    teacher = teacher_info(summary, recipe)
    data = data_info(summary, recipe)
    head = head_of(config)
    sections = [
        f"---\n{card_data(run_dir.name, config, summary, recipe, teacher, data).to_yaml()}\n---", MARKER,
        _intro(run_dir.name, config, summary, recipe, teacher),
        _model_section(folder, config, head),
        _teacher_section(summary, teacher),
        _data_section(data),
        _loss_section(summary, recipe),
        _results_section(summary, head),
        f"## Recipe\n\nThe resolved recipe (RUN/recipe.toml: every key, defaults included):\n\n```toml\n"
        f"{recipe_text.rstrip()}\n```",
        _reproduce_section(run_dir, summary, recipe),
        _load_section(folder, config, head, repo_id),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _license(name: str | None) -> str | None:
    """The license of timm's pretrained weights for `name` (None when unknown or not a timm name)."""
    if not name:
        return None
    from timm.models import get_pretrained_cfg

    from kdkit.models.names import ALIASES

    try:
        cfg = get_pretrained_cfg(ALIASES.get(name, name))
    except Exception:  # unknown names and tags: no license known
        return None
    return getattr(cfg, "license", None)


def teacher_info(summary: dict, recipe: dict) -> dict:
    """The teacher's name, where its weights came from, their sha256 (and what was hashed) and license."""
    m = recipe["model"]
    if summary.get("mode") == "train" or summary.get("conventions", {}).get("loss") == "none":
        return {}
    names, weights = m.get("teacher"), m.get("teacher_weights")
    if isinstance(names, list):
        if len(names) > 1:  # an ensemble: its members, each as the recipe names them
            return {"name": f"ensemble({', '.join(names)})", "license": None,
                    "weights": ", ".join(weights) if isinstance(weights, list) else weights or "hub"}
        names, weights = names[0], weights[0] if isinstance(weights, list) else weights
    info: dict = {"name": names or None, "weights": weights or None}
    logits = summary.get("logits")
    if logits:  # outputs read from a logit cache: its manifest says which teacher wrote them
        info["cache"] = logits.get("cache")
        manifest = Path(logits.get("cache") or "") / "manifest.json"
        if manifest.is_file():
            t = json.loads(manifest.read_text()).get("teacher", {})
            info.update(name=t.get("name") or info["name"], weights=t.get("weights") or info["weights"],
                        sha256=t.get("weights_sha256"), hashed="state dict (the cache manifest's weights_sha256)")
    if summary.get("teacher_check", {}).get("weights_sha256"):
        info.update(sha256=summary["teacher_check"]["weights_sha256"], hashed="state dict (recorded by the run)")
    weights = info["weights"]
    if weights and weights != "hub" and not info.get("sha256"):
        info.update(_weights_sha256(Path(weights)))
    if weights and weights != "hub":
        cfg = Path(weights) if Path(weights).is_dir() else Path(weights).parent
        cfg = cfg / "config.json"
        info["license"] = json.loads(cfg.read_text()).get("pretrained_cfg", {}).get("license") \
            if cfg.is_file() else None
    else:
        info["license"] = _license(info["name"])
    return info


def _weights_sha256(path: Path) -> dict:
    """sha256 of a teacher's weights: over the tensors of a safetensors file (or a timm folder's
    model.safetensors), as kdkit caches record it; over the bytes of any other file."""
    from kdkit.cache.manifest import state_sha256

    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        return {"sha256": None, "hashed": f"not available ({file} is gone)"}
    if file.suffix == ".safetensors":
        return {"sha256": state_sha256(load_file(str(file))),
                "hashed": f"state dict of {file.name}, as kdkit caches record it"}
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "hashed": f"bytes of {file.name}"}


def data_info(summary: dict, recipe: dict) -> dict:
    """The data's source, splits and fingerprints (kdkit.cache.manifest.data_identity): recorded by the
    run or its cache when they are, else computed from the data folder when it is still there."""
    from kdkit.cache.manifest import data_identity
    from kdkit.data import open_dataset, open_unlabeled

    d = recipe["data"]
    recorded = dict(summary.get("data_identity") or {})
    # "auto-eval" names a search (val, validation, test): the split the run found is in its identity
    eval_split = (recorded.get("eval") or {}).get("split") or d["eval_split"]
    info: dict = {"source": d["path"], "train_split": d["train_split"], "eval_split": eval_split,
                  "unlabeled": d.get("unlabeled") or None, "train_images": summary.get("train_images"),
                  "eval_images": summary.get("eval_images"), "identities": {}}
    cache = Path((summary.get("logits") or {}).get("cache") or "") / "manifest.json"
    if "train" not in recorded and cache.is_file():
        manifest = json.loads(cache.read_text())
        recorded["train"] = manifest.get("data")
        if manifest.get("unlabeled"):
            recorded["unlabeled"] = manifest["unlabeled"]
    info["identities"].update({k: v for k, v in recorded.items() if v})
    if str(d["path"]).startswith("hf:"):
        return info  # a hub dataset is named by its id; opening it here could need the network
    ids = info["identities"]
    wanted = {"train", "eval"} | ({"unlabeled"} if d.get("unlabeled") and not str(d["unlabeled"]).startswith("hf:")
                                  else set())
    if wanted <= set(ids):
        return info  # all recorded by the run (or its cache)
    try:
        options = {k: d.get(k) or None for k in ("input_key", "target_key", "class_map")}
        train = open_dataset(d["path"], d["train_split"], **options)
        ids.setdefault("train", data_identity(train, d["path"], d["train_split"]))
        ids.setdefault("eval", data_identity(open_dataset(d["path"], d["eval_split"], classes=train.classes,
                                                          **{**options, "class_map": None}),
                                             d["path"], d["eval_split"]))
        if d.get("unlabeled") and not str(d["unlabeled"]).startswith("hf:"):
            ids.setdefault("unlabeled", data_identity(open_unlabeled(d["unlabeled"], train.classes),
                                                      d["unlabeled"], ""))
    except KdkitError as e:
        info["unavailable"] = str(e)
    return info


def card_data(name: str, config: dict, summary: dict, recipe: dict, teacher: dict, data: dict) -> ModelCardData:
    """The card's metadata (the Hub's model card fields) as huggingface_hub's ModelCardData: library,
    tags, license and datasets where known, and each head's top-1/top-5 as eval results (the Hub's
    model-index)."""
    distilled = bool(teacher)
    tags = ["image-classification", "timm", "kdkit"] + (["knowledge-distillation"] if distilled else [])
    if head_of(config) == "token":
        tags.append("deit")
    licenses = {x for x in (_license(recipe["model"]["student"]) if recipe["model"].get("pretrained") else None,
                            teacher.get("license")) if x}
    source = str(data["source"])
    hub = source[3:] if source.startswith("hf:") else None
    ev = summary.get("eval") or {}
    heads = ("fused", "class", "dist") if is_two_headed(config) else ("class",)
    results = [EvalResult(task_type="image-classification", task_name="Image Classification",
                          dataset_type=hub or "imagefolder", dataset_name=hub or Path(source).name or source,
                          dataset_split=data["eval_split"], metric_type="accuracy",
                          metric_name=f"top-{k} ({h})" if len(heads) > 1 else f"top-{k}",
                          metric_value=round(float(ev[f"{h}_top{k}"]), 2))
               for h in heads for k in (1, 5) if f"{h}_top{k}" in ev]
    return ModelCardData(library_name="timm", pipeline_tag="image-classification", tags=tags,
                         license=licenses.pop() if len(licenses) == 1 else None, datasets=[hub] if hub else None,
                         metrics=["accuracy"], model_name=name, eval_results=results or None)


def front_matter(name: str, config: dict, summary: dict, recipe: dict, teacher: dict, data: dict) -> dict:
    """The card's YAML metadata as a dict (card_data's fields, with its model-index)."""
    return card_data(name, config, summary, recipe, teacher, data).to_dict()


def _table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _intro(name: str, config: dict, summary: dict, recipe: dict, teacher: dict) -> str:
    how = (f"distilled from `{teacher.get('name') or 'a teacher'}`" if teacher else "trained on labels only")
    return (f"# {name}\n\nA `{config['architecture']}` image classifier ({config['num_classes']} classes) {how} with "
            f"kdkit (`kdkit {summary.get('mode', 'distill')}`, {_plural(recipe['optim']['epochs'], 'epoch')}).")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"


def _model_section(folder: Path, config: dict, head: str) -> str:
    try:
        student, _, _ = load_saved(folder)
        n = sum(p.numel() for p in student.parameters())
    except KdkitError:  # a custom module's folder cannot be rebuilt by name: its saved tensors (buffers too)
        n = sum(t.numel() for f in ("model.safetensors", HEAD_FILE) if (folder / f).is_file()
                for t in load_file(str(folder / f)).values())
    pcfg = config["pretrained_cfg"]
    labels = config.get("label_names") or []
    shown = ", ".join(labels[:20]) + (f", ... ({len(labels)} in all)" if len(labels) > 20 else "")
    return "## Model\n\n" + _table([
        ("architecture", f"`{config['architecture']}` (timm), model_args `{json.dumps(config.get('model_args', {}))}`"),
        ("head", f"{head}: {HEAD_TEXT.get(head, head)}"),
        ("parameters", f"{n / 1e6:.2f}M ({n:,})"),
        ("input", f"{'x'.join(map(str, pcfg['input_size']))}, mean {list(pcfg['mean'])}, std {list(pcfg['std'])}, "
                  f"interpolation {pcfg.get('interpolation')}, crop_pct {pcfg.get('crop_pct')}"),
        ("classes", f"{config['num_classes']}: {shown}" if labels else str(config["num_classes"])),
    ])


def _teacher_section(summary: dict, teacher: dict) -> str:
    if not teacher:
        return "## Teacher\n\nNone: supervised training on the labels (`kdkit train` or loss `none`)."
    rows = [("name", f"`{teacher.get('name')}`")]
    if teacher.get("cache"):
        rows.append(("outputs", f"read from the logit cache `{teacher['cache']}`"))
    rows.append(("weights", f"`{teacher['weights']}`" if teacher.get("weights") not in (None, "hub")
                 else "timm's pretrained weights (hub)"))
    if teacher.get("sha256"):
        rows.append(("weights sha256", f"`{teacher['sha256']}` ({teacher['hashed']})"))
    else:
        rows.append(("weights sha256", teacher.get("hashed") or "not recorded (timm's hub weights)"))
    check = summary.get("teacher_check")
    if check:
        rows.append(("top-1 (teacher check)", f"{check['teacher_top1_slice']:.2f}% on {check['images']} evaluation "
                     f"images, through the student's pipeline"))
    if teacher.get("license"):
        rows.append(("license", teacher["license"]))
    return "## Teacher\n\n" + _table(rows)


def _data_section(data: dict) -> str:
    rows = [("source", f"`{data['source']}`"),
            ("train split", f"`{data['train_split']}`, {data['train_images']} images"),
            ("evaluation split", f"`{data['eval_split']}`, {data['eval_images']} images")]
    if data["unlabeled"]:
        rows.append(("unlabeled images", f"`{data['unlabeled']}`"))
    for split, ident in data["identities"].items():
        rows.append((f"fingerprint ({split})", f"`{ident['fingerprint']}` ({ident['num_samples']} samples, "
                     f"{len(ident['classes'])} classes)"))
    if data.get("unavailable"):
        rows.append(("fingerprint", f"not computed: {data['unavailable']}"))
    return ("## Data\n\n" + _table(rows) + "\n\nThe fingerprint is kdkit's data identity, as logit caches record it: "
            "sha256 of the sorted (path, size, label) list of a folder, or the `datasets` fingerprint.")


def _loss_section(summary: dict, recipe: dict) -> str:
    conv = dict(summary.get("conventions") or {})
    kind = conv.get("loss", "?")
    aug = recipe.get("aug", {})
    smoothing = aug.get("label_smoothing", 0.0)
    if conv.get("label_smoothing") == 0.0 and smoothing and (aug.get("mixup", 0) or aug.get("cutmix", 0)):
        # build_loss gives the loss 0 then: Mixup/CutMix smooths the mixed targets (timm's mixup_target)
        conv["label_smoothing"] = (f"{smoothing:g}, applied by Mixup/CutMix to the mixed targets (timm's "
                                   f"mixup_target, as DeiT); the loss adds none")
    return (f"## Loss\n\n`{kind}`: {LOSS_TEXT.get(kind, '')}.\n\n| convention | value |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in conv.items()))


def _results_section(summary: dict, head: str) -> str:
    ev = summary.get("eval") or {}
    if "class_top1" not in ev:
        return "## Results\n\nNot evaluated (the run has no evaluation result)."
    two = head in TWO_HEADED
    heads = [("class", "class head"), ("dist", "distillation head"), ("fused", "fused: (class + dist) / 2")] \
        if two else [("class", "the one head")]
    prefixes = ("", "ema_") if "ema_class_top1" in ev else ("",)
    rows = [f"| {'EMA ' if p else ''}{label} | {ev[f'{p}{h}_top1']:.2f} | {ev[f'{p}{h}_top5']:.2f} |"
            for p in prefixes for h, label in heads]
    return (f"## Results\n\nOn the evaluation split ({ev.get('n')} images):\n\n| head | top-1 % | top-5 % |\n"
            f"|---|---|---|\n" + "\n".join(rows))


def _reproduce_section(run_dir: Path, summary: dict, recipe: dict) -> str:
    verb = summary.get("mode", "distill")
    return (f"## Reproduce\n\n`recipe.toml` is a complete recipe: save the one above as `recipe.toml` (it is "
            f"`{run_dir / 'recipe.toml'}` here) and run\n\n```bash\nkdkit {verb} --recipe {run_dir / 'recipe.toml'} "
            f"--name {run_dir.name}-rerun\n```\n\n`--name` keeps the new run out of this one's folder "
            f"(`{recipe['run']['output']}/{recipe['run']['name']}`); `--data DIR` points it at the data where it "
            f"lives now. This run used {_plural(summary.get('processes', 1), 'process')}, a global batch of "
            f"{summary.get('global_batch_size')} and precision {summary.get('precision')}.")


def _load_section(folder: Path, config: dict, head: str, repo_id: str | None) -> str:
    native = head == "token" and "dist_token" not in _head_keys(folder)
    inserted = head == "token" and not native

    def code(where: str) -> str:
        text = (f"```python\nimport timm\n\nmodel = timm.create_model(\"{where}\", pretrained=True).eval()\n"
                f"cfg = timm.data.resolve_data_config({{}}, model=model)  # input size, mean, std, crop as trained\n"
                f"transform = timm.data.create_transform(**cfg)\nlogits = model(transform(image).unsqueeze(0))\n```")
        if needs_kdkit(config["architecture"]):
            text += (f"\n\n`{config['architecture']}` is registered with timm by kdkit: `import kdkit.models` before "
                     f"`timm.create_model`.")
        return text

    here = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"
    export = (f"```bash\nkdkit export {folder} --format safetensors   # writes {folder}-timm\n```\n\n"
              f"{code(f'local-dir:{folder}-timm')}")
    if head == "shared" or native:
        what = "the fused logits, (class + distillation) / 2 (timm's distilled DeiT in eval mode)" if native \
            else "its one head"
        return f"## Load with timm\n\nPlain timm rebuilds it, with {what}:\n\n{code(here)}"
    others = (f"`kdkit export {folder} --format onnx` writes ONNX, and `kdkit eval --weights {folder} --data DIR` "
              f"evaluates all three heads.")
    if inserted:
        return ("## Load with timm\n\nThe distillation token was inserted by kdkit (it is in `kdkit_head.safetensors`): "
                "plain timm alone would build the ViT without it, which is not the trained network. Exported as timm's "
                f"distilled DeiT, it loads with plain timm and gives the fused logits:\n\n{export}\n\n{others}")
    return (f"## Load with timm\n\nPlain timm loads the model with its class head (the distillation head is in "
            f"`kdkit_head.safetensors`, which timm ignores):\n\n{code(here)}\n\nFor the fused logits with plain "
            f"timm, export the two heads collapsed into one linear layer:\n\n{export}\n\n{others}")


def _head_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    from kdkit.models.saved import HEAD_FILE

    path = folder / HEAD_FILE
    if not path.is_file():
        return set()
    with safe_open(str(path), "pt") as f:
        return set(f.keys())

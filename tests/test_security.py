"""Security stays as it is: nothing kdkit loads is unpickled (torch.load only with weights_only=True),
recipes are data (a YAML object tag is refused), and `hf:` datasets never run a loading script."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kdkit
from kdkit.config import load_recipe, read_recipe_file
from kdkit.data import open_dataset, open_unlabeled
from kdkit.registry import KdkitError
from tests.helpers import run_cli

SOURCE = Path(kdkit.__file__).resolve().parent
# calls that unpickle a file unless given weights_only=True (timm's helpers pass it on to torch.load)
WEIGHT_LOADERS = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url",
                  "timm.models.load_checkpoint", "timm.models.load_state_dict", "timm.models._helpers.load_checkpoint",
                  "timm.models._helpers.load_state_dict"}
# calls that run code from data, allowed nowhere
UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads", "yaml.load",
          "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all", "yaml.full_load_all",
          "eval", "exec", "torch.jit.load", "dill.load", "dill.loads", "joblib.load"}


def qualified_calls(tree: ast.Module) -> list[tuple[str, ast.Call]]:
    """Every call in a module with its callee's full dotted name, imports resolved
    (`from timm.models import load_checkpoint as lc; lc(...)` -> "timm.models.load_checkpoint")."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(f: ast.expr) -> str | None:
        if isinstance(f, ast.Name):
            return names.get(f.id, f.id)
        if isinstance(f, ast.Attribute) and (base := dotted(f.value)):
            return f"{base}.{f.attr}"
        return None

    return [(name, node) for node in ast.walk(tree) if isinstance(node, ast.Call) and (name := dotted(node.func))]


def weights_only_true(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def scan(source: str) -> tuple[list[str], list[str], int]:
    """(loader calls without weights_only=True, unsafe calls, loader calls found) of one module."""
    bad, unsafe, found = [], [], 0
    for name, call in qualified_calls(ast.parse(source)):
        if name in WEIGHT_LOADERS:
            found += 1
            if not weights_only_true(call):
                bad.append(f"{name} at line {call.lineno}")
        elif name in UNSAFE:
            unsafe.append(f"{name} at line {call.lineno}")
    return bad, unsafe, found


def test_the_scanner_finds_what_it_must_refuse():
    src = """
import torch, yaml
import torch as T
from timm.models import load_checkpoint as lc
torch.load("a")
T.load("b", weights_only=False)
torch.load("c", weights_only=True)
lc(model, "d")
yaml.load(text)
yaml.safe_load(text)
model.eval()
model.load_state_dict(sd)
eval("1")
"""
    bad, unsafe, found = scan(src)
    assert bad == ["torch.load at line 5", "torch.load at line 6", "timm.models.load_checkpoint at line 8"]
    assert unsafe == ["yaml.load at line 9", "eval at line 13"] and found == 4


def test_kdkit_loads_weights_only_with_weights_only_true_and_never_unpickles():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 30
    bad, unsafe, found = [], [], 0
    for path in files:
        b, u, n = scan(path.read_text())
        rel = path.relative_to(SOURCE.parent)
        bad += [f"{rel}: {x}" for x in b]
        unsafe += [f"{rel}: {x}" for x in u]
        found += n
    assert not bad, f"weight loading without weights_only=True: {bad}"
    assert not unsafe, f"calls that run code from data: {unsafe}"
    assert found >= 1  # kdkit.models.load_weights' timm.models.load_checkpoint(..., weights_only=True)


def test_a_yaml_recipe_with_a_python_object_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"optim:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("optim:\n  lr: 0.002\n")
    assert read_recipe_file(plain) == {"optim": {"lr": 0.002}}  # YAML recipes do load, as data
    assert load_recipe(plain).optim.lr == 0.002
    with pytest.raises(KdkitError, match="cannot parse recipe"):
        load_recipe(evil)
    assert run_cli("train", "--recipe", evil, "--data", tmp_path) == 2
    assert "cannot parse recipe" in capsys.readouterr().err
    for tag in ("!!python/name:os.system", "!!python/object:collections.OrderedDict {}"):
        evil.write_text(f"run:\n  name: {tag}\n")
        with pytest.raises(KdkitError, match="cannot parse recipe"):
            read_recipe_file(evil)
    assert not marker.exists()


def test_hub_datasets_are_opened_without_remote_code(monkeypatch):
    import datasets

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", record)
    with pytest.raises(KdkitError, match="could not load dataset 'someone/cifar'"):
        open_dataset("hf:someone/cifar", "train")
    with pytest.raises(KdkitError, match="could not load dataset 'someone/unlabeled'"):
        open_unlabeled("hf:someone/unlabeled", ["a", "b"])
    assert len(calls) == 2 and all(c.get("trust_remote_code") is False for c in calls)


def test_a_dataset_with_a_loading_script_is_refused_and_its_script_never_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_TRUST_REMOTE_CODE", "1")  # what made datasets < 4 run scripts unasked
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "import datasets\n\nclass Evil(datasets.GeneratorBasedBuilder):\n    pass\n")
    with pytest.raises(KdkitError, match="could not load dataset"):
        open_dataset(f"hf:{folder}", "train")
    assert not marker.exists()

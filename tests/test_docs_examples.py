"""The documentation's Python examples run as written (README's, docs/getting-started.md's custom
pair), and the API reference builds from the docstrings with every public name in it."""

import importlib.util
import re
from pathlib import Path

import torch

import kdkit
from tests.helpers import TinyConvNet

ROOT = Path(__file__).resolve().parent.parent


def python_block(path: Path, after: str) -> str:
    """The first ```python block of `path` after the text `after`."""
    text = path.read_text()
    found = re.search(r"```python\n(.*?)```", text[text.index(after):], re.S)
    assert found, f"no python block after {after!r} in {path}"
    return found.group(1)


def test_the_readme_example_runs_as_written(tiny_data, tmp_path, monkeypatch):
    code = python_block(ROOT / "README.md", "\nPython (")
    assert '"DIR"' in code
    monkeypatch.chdir(tmp_path)
    namespace = {"my_student": TinyConvNet(), "my_teacher": TinyConvNet()}
    exec(compile(code.replace('"DIR"', repr(str(tiny_data))), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert type(namespace["model"]) is TinyConvNet and result.run_dir == Path("runs") / result.run_dir.name
    assert result.summary["eval"]["heads"] == 2 and result.summary["conventions"]["tau"] == 4.0
    assert (tmp_path / result.run_dir / "student" / "kdkit_head.safetensors").is_file()


def test_the_custom_pair_of_getting_started_runs_as_written(tiny_data, tmp_path, monkeypatch, capsys):
    """On a slice of the bundled sample (120 training and 60 test images): kdkit.data.sample_path
    points there."""
    code = python_block(ROOT / "docs" / "getting-started.md", "<!-- example: custom-pair -->")
    monkeypatch.setattr("kdkit.data.sample_path", lambda: tiny_data)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "getting-started.md", "exec"), namespace)
    student, teacher = namespace["student"], namespace["teacher"]
    assert type(student).__name__ == "SmallCNN" and student.fc.in_features == 16
    assert type(teacher.model).__name__ == "SmallCNN" and teacher.model.fc.in_features == 64
    assert re.search(r"teacher top-1 [\d.]+%, student top-1 [\d.]+% \(heads fused\)", capsys.readouterr().out)
    saved = type(student)(8)
    saved.load_state_dict(torch.load(tmp_path / "runs" / "student.pt"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(saved.eval()(x), student(x))
    assert namespace["probs"].shape == (1, 10)


def test_the_lower_level_pieces_of_getting_started_run_as_written(tiny_data, monkeypatch, capsys):
    """The run assembled by hand, on the tiny slice of the sample: its student learns from the
    bundled teacher, and the datasets it opened carry the transforms they were opened with."""
    code = python_block(ROOT / "docs" / "getting-started.md", "<!-- example: lower-level -->")
    teacher = '"kdkit/assets/teachers/resnet9_cifar_s"'
    assert teacher in code
    monkeypatch.setattr("kdkit.data.sample_path", lambda: tiny_data)
    namespace: dict = {}
    exec(compile(code.replace(teacher, repr(str(ROOT / teacher.strip('"')))), "getting-started.md", "exec"), namespace)
    train_ds, eval_ds, result = namespace["train_ds"], namespace["eval_ds"], namespace["result"]
    assert len(train_ds) == 120 and len(eval_ds) == 60 and train_ds.transform is not None
    assert tuple(eval_ds[0]["image"].shape) == (3, 32, 32)
    assert result.eval["n"] == 60 and 0.0 <= result.eval["fused_top1"] <= 100.0
    assert re.search(r"[\d.]+ [\d.]+ [\d.]+", capsys.readouterr().out)


def test_the_api_reference_is_built_from_the_docstrings(tmp_path):
    spec = importlib.util.spec_from_file_location("build_api", ROOT / "docs" / "build_api.py")
    build_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_api)
    page = build_api.build(tmp_path, ["kdkit", "kdkit.api"]).read_text()
    for name in kdkit.__all__:
        if name != "__version__":
            assert f'id="{name}"' in page, name
    api = (tmp_path / "kdkit" / "api.html").read_text()
    assert 'id="distill"' in api and 'id="Result"' in api
    first_line = kdkit.distill.__doc__.split("\n")[0].split("`")[0]
    assert first_line.strip() and first_line.strip()[:40] in api

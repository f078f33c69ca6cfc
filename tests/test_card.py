"""The model card (kdkit/card.py) against the run's files read here on their own, and `kdkit push`
without a network: one line within seconds, the folder to upload left in place."""

import hashlib
import json
import shlex
import shutil
import socket
import threading
import time
import tomllib

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from kdkit.card import MARKER, front_matter, teacher_info, write_model_card
from kdkit.hub import TIMEOUT_S
from tests.helpers import run_cli


def parse(card: str) -> tuple[dict, dict[str, str]]:
    """(front matter, {section title: body}) of a card."""
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    sections = {}
    for part in card[end + 5:].split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = body
    return yaml.safe_load(card[4:end]), sections


def table(body: str) -> dict[str, str]:
    """The rows of the first markdown table in `body`: {first cell: second cell}."""
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("|")]
    return {cells[0].strip(): cells[1].strip() for cells in rows[2:]}


def state_dict_sha256(state: dict) -> str:
    """The documented hash (kdkit/cache/manifest.py): names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def folder_fingerprint(split_dir) -> str:
    """data_identity's fingerprint of an ImageFolder split: sorted classes, sorted files, (path, size, label)."""
    h = hashlib.sha256()
    for label, cls in enumerate(sorted(p for p in split_dir.iterdir() if p.is_dir())):
        for f in sorted(cls.iterdir()):
            h.update(f"{cls.name}/{f.name}|{f.stat().st_size}|{label}\n".encode())
    return h.hexdigest()


def test_card_sections_hold_the_runs_values(tiny_runs, tiny_data, teacher_dir):
    run = tiny_runs["native"]
    path = write_model_card(run)
    assert path == run / "student" / "README.md"
    meta, sec = parse(path.read_text())
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "student" / "config.json").read_text())
    manifest = json.loads((tiny_runs["cache"] / "manifest.json").read_text())  # what `kdkit cache` recorded

    assert meta["library_name"] == "timm" and {"kdkit", "knowledge-distillation", "deit"} <= set(meta["tags"])
    assert "license" not in meta and "datasets" not in meta  # neither is known for a local teacher and folder
    got = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    ev = summary["eval"]
    assert got == {f"top-{k} ({h})": round(ev[f"{h}_top{k}"], 2) for h in ("fused", "class", "dist") for k in (1, 5)}

    model = table(sec["Model"])
    assert f"`{config['architecture']}`" in model["architecture"]
    plain = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    n = sum(p.numel() for p in plain.parameters())
    assert f"({n:,})" in model["parameters"]
    assert model["head"].startswith("token")

    teacher = table(sec["Teacher"])
    assert teacher["name"] == "`resnet10t`" and str(teacher_dir) in teacher["weights"]
    sha = state_dict_sha256(load_file(str(teacher_dir / "model.safetensors")))
    assert sha == manifest["teacher"]["weights_sha256"]  # the cache hashed the loaded teacher model
    assert f"`{sha}`" in teacher["weights sha256"]
    assert teacher["top-1 (teacher check)"].startswith(f"{summary['teacher_check']['teacher_top1_slice']:.2f}% on "
                                                       f"{summary['teacher_check']['images']} ")

    data = table(sec["Data"])
    assert folder_fingerprint(tiny_data / "train") == manifest["data"]["fingerprint"]
    assert data["fingerprint (train)"].startswith(f"`{manifest['data']['fingerprint']}` (120 samples, 10 classes)")
    assert data["fingerprint (eval)"].startswith(f"`{folder_fingerprint(tiny_data / 'test')}` (60 samples")

    loss = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in sec["Loss"].splitlines()
            if row.startswith("| ") and "convention" not in row}
    assert loss == {k: str(v) for k, v in summary["conventions"].items()}

    results = [r.split("|")[1:4] for r in sec["Results"].splitlines() if r.startswith("| ") and "%" not in r]
    assert [[c.strip() for c in r[1:]] for r in results] == [
        [f"{ev[f'{h}_top1']:.2f}", f"{ev[f'{h}_top5']:.2f}"] for h in ("class", "dist", "fused")]

    toml_block = sec["Recipe"].split("```toml\n", 1)[1].split("\n```", 1)[0]
    assert tomllib.loads(toml_block) == tomllib.loads((run / "recipe.toml").read_text())
    assert f'timm.create_model("local-dir:{run / "student"}", pretrained=True)' in sec["Load with timm"]
    assert "fused" in sec["Load with timm"]


def test_card_names_the_split_found_and_the_smoothing_mixup_applies(tiny_data, teacher_dir, tmp_path):
    """Preset deit: eval split "auto-eval" (the search finds test/) and label smoothing 0.1, which
    Mixup/CutMix applies to the mixed targets (the loss itself then gets 0.0)."""
    assert run_cli("distill", "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--student", "resnet10t",
                   "--set", "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}", "--img-size", "32",
                   "--data", tiny_data, "--epochs", "1", "--batch-size", "16", "--workers", "0", "--no-progress",
                   "--output", tmp_path, "--name", "deit") == 0
    run = tmp_path / "deit"
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    assert recipe["data"]["eval_split"] == "auto-eval" and recipe["aug"]["label_smoothing"] == 0.1
    assert recipe["aug"]["mixup"] > 0 and json.loads((run / "summary.json").read_text())["conventions"][
        "label_smoothing"] == 0.0
    meta, sec = parse((run / "student" / "README.md").read_text())
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    assert table(sec["Data"])["evaluation split"] == "`test`, 60 images"
    loss = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in sec["Loss"].splitlines()
            if row.startswith("| ") and "convention" not in row}
    assert loss["label_smoothing"].startswith("0.1, applied by Mixup/CutMix")


def test_the_cards_command_reproduces_the_run(tiny_runs):
    run = tiny_runs["native"]
    _, sec = parse(write_model_card(run).read_text())
    command = sec["Reproduce"].split("```bash\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(command)
    assert argv[:4] == ["kdkit", "distill", "--recipe", str(run / "recipe.toml")]
    assert run_cli(*argv[1:]) == 0
    again = run.parent / argv[argv.index("--name") + 1]
    assert again != run
    a, b = load_file(str(run / "student" / "model.safetensors")), load_file(str(again / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_card_of_a_run_that_read_a_logit_cache(tiny_runs):
    run = tiny_runs["cached"]
    _, sec = parse(write_model_card(run).read_text())
    manifest = json.loads((tiny_runs["cache"] / "manifest.json").read_text())
    teacher = table(sec["Teacher"])
    assert str(tiny_runs["cache"]) in teacher["outputs"]
    assert manifest["teacher"]["weights_sha256"] in teacher["weights sha256"]
    assert "cache manifest" in teacher["weights sha256"]
    assert manifest["data"]["fingerprint"] in table(sec["Data"])["fingerprint (train)"]


def test_card_of_a_supervised_single_head_run(tiny_runs):
    run = tiny_runs["single"]
    meta, sec = parse(write_model_card(run).read_text())
    ev = json.loads((run / "summary.json").read_text())["eval"]
    assert "knowledge-distillation" not in meta["tags"]
    assert sec["Teacher"].strip().startswith("None")
    rows = [r for r in sec["Results"].splitlines() if r.startswith("| ") and "%" not in r]
    assert rows == [f"| the one head | {ev['class_top1']:.2f} | {ev['class_top5']:.2f} |"]
    assert "kdkit train --recipe" in sec["Reproduce"]
    assert "its one head" in sec["Load with timm"]


def test_card_of_a_dual_head_run_says_how_to_get_the_fused_head(tiny_runs):
    run = tiny_runs["dual"]
    _, sec = parse(write_model_card(run).read_text())
    head = load_file(str(run / "student" / "kdkit_head.safetensors"))
    plain = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    n = sum(p.numel() for p in plain.parameters()) + sum(t.numel() for t in head.values())
    assert f"({n:,})" in table(sec["Model"])["parameters"]
    assert "kdkit_head.safetensors" in sec["Load with timm"] and "--format safetensors" in sec["Load with timm"]


def test_card_of_an_inserted_token_loads_through_its_export_command(tiny_runs, tiny_data):
    run = tiny_runs["inserted"]
    _, sec = parse(write_model_card(run).read_text())
    load = sec["Load with timm"]
    command = shlex.split(load.split("```bash\n", 1)[1].split("\n```", 1)[0], comments=True)
    assert command[:2] == ["kdkit", "export"] and run_cli(*command[1:]) == 0
    where = load.split('timm.create_model("', 1)[1].split('"', 1)[0]
    model = timm.create_model(where, pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformerDistilled"


def test_license_comes_from_the_teachers_config(tiny_runs, teacher_dir, tmp_path):
    licensed = tmp_path / "teacher"
    shutil.copytree(teacher_dir, licensed)
    cfg = json.loads((licensed / "config.json").read_text())
    cfg["pretrained_cfg"]["license"] = "apache-2.0"
    (licensed / "config.json").write_text(json.dumps(cfg))
    run = tiny_runs["native"]
    summary = json.loads((run / "summary.json").read_text())
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    recipe["model"]["teacher_weights"] = str(licensed)
    teacher = teacher_info(summary, recipe)
    assert teacher["license"] == "apache-2.0"
    config = json.loads((run / "student" / "config.json").read_text())
    assert front_matter("x", config, summary, recipe, teacher, {"source": "/d", "eval_split": "val"})["license"] \
        == "apache-2.0"


@pytest.fixture
def run_copy(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["dual"], run)
    (run / "student" / "README.md").unlink(missing_ok=True)
    return run


def push_error(capsys, *argv) -> tuple[str, float]:
    capsys.readouterr()
    start = time.perf_counter()
    code = run_cli("push", *argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdkit push: error: "), err
    return err, seconds


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_push_offline_fails_fast_and_leaves_the_folder(run_copy, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err, seconds = push_error(capsys, run_copy, "--repo", "someone/tiny-dual")
    assert seconds < 5, seconds
    assert "HF_HUB_OFFLINE" in err and str(run_copy / "student") in err
    card = (run_copy / "student" / "README.md").read_text()
    assert MARKER in card and "hf-hub:someone/tiny-dual" in card
    assert {"model.safetensors", "config.json", "kdkit_head.safetensors"} <= {p.name for p in (run_copy / "student").iterdir()}


def test_push_without_a_network_fails_fast(run_copy, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # nothing listens: refused
    err, seconds = push_error(capsys, run_copy / "student", "--repo", "someone/tiny-dual")
    assert seconds < 5, seconds
    assert "cannot reach the Hub" in err and str(run_copy / "student") in err
    assert (run_copy / "student" / "README.md").is_file()


def test_push_to_a_hub_that_never_answers_stops_at_the_timeout(run_copy, capsys, monkeypatch):
    server = socket.socket()  # accepts connections (the kernel does) and never answers
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        err, seconds = push_error(capsys, run_copy, "--repo", "someone/tiny-dual")
    finally:
        threading.Thread(target=server.close).start()
    assert seconds < TIMEOUT_S + 3, seconds
    assert "cannot reach the Hub" in err and "timed out" in err


def test_push_keeps_your_own_card_and_checks_the_repo_id(run_copy, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mine = "# my own card\n"
    (run_copy / "student" / "README.md").write_text(mine)
    push_error(capsys, run_copy, "--repo", "someone/tiny-dual")
    assert (run_copy / "student" / "README.md").read_text() == mine
    err, _ = push_error(capsys, run_copy, "--repo", "not a repo")
    assert "USER/NAME" in err
    err, _ = push_error(capsys, run_copy.parent / "nothing", "--repo", "someone/x")
    assert "does not exist" in err

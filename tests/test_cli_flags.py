"""The command line itself: help without torch, grouped flags with choices and the defaults a run
uses, timm's names as aliases of the same recipe keys, -b per process, and shell completion."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kdkit.cli import VERBS, UsageError, build_parser, main
from kdkit.cli.common import BUILTIN_HEADS, BUILTIN_LOSSES, PSEUDO_LABELS, recipe_from_args
from kdkit.registry import KdkitError

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "accelerate", "datasets")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def _imported_by(argv: list[str]) -> tuple[list[str], str]:
    """The heavy top-level modules in sys.modules after main(argv) in a fresh interpreter, and its stdout."""
    code = f"""
import json, sys
from kdkit.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    *out, last = r.stdout.rstrip().splitlines()
    return json.loads(last), "\n".join(out)


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["train", "--help"], ["cache", "--help"],
                                  ["--version"], ["completion", "bash"], ["distill", "--precision", "bf61"]])
def test_help_and_usage_errors_import_no_torch(argv):
    heavy, out = _imported_by(argv)
    assert heavy == [], f"kdkit {' '.join(argv)} imported {heavy}"
    if argv == ["--help"]:
        # one line per verb: its name, then its help on the same line
        lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ") and line.split()}
        for verb in VERBS:
            assert verb in lines and len(lines[verb].split()) > 1, out


def test_import_kdkit_is_lazy_and_keeps_its_public_names():
    r = _python("import sys, kdkit; print(kdkit.__version__, 'torch' in sys.modules); "
                "from kdkit import distill; print('torch' in sys.modules, distill.__module__)")
    assert r.returncode == 0, r.stderr
    # the version of the installed distribution (pyproject.toml's dynamic version, read by setuptools)
    assert r.stdout.split() == [importlib.metadata.version("kdkit"), "False", "True", "kdkit.api"]
    import kdkit
    from kdkit.losses import SoftDistillationLoss

    assert kdkit.SoftDistillationLoss is SoftDistillationLoss
    assert all(getattr(kdkit, name) is not None for name in kdkit.__all__)
    assert set(kdkit.__all__) <= set(dir(kdkit)) and set(kdkit.__all__) == {*kdkit._SOURCES, "__version__"}
    with pytest.raises(AttributeError):
        kdkit.not_a_name  # noqa: B018


def _help(verb: str) -> str:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices[verb].format_help()


def test_training_verbs_group_their_flags_and_show_the_runs_defaults():
    text = _help("distill")
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[:9] == ["options", "recipe", "model", "data", "augmentation", "loss", "optimisation", "run",
                          "distributed"]
    flat = " ".join(text.split())
    assert "(default: 128, from data.batch_size)" in flat
    # without --recipe distill runs DeiT's recipe: random erasing 0.25, 3 repeats; train runs kdkit's own 0
    assert "(default: 0.25 from preset deit, 0 with --preset none; aug.reprob)" in flat
    assert "(default: 3 from preset deit, 0 with --preset none; aug.repeated_aug)" in flat
    assert "--precision {auto,no,bf16,fp16}" in flat and "--pseudo-label {auto,soft,hard}" in flat
    assert "--loss {none,soft,hard,dkd,dist,feature,ctkd,mlkd}" in flat and "--head {auto,token,dual,shared,native}" in flat
    assert "--data DIR" in flat and "-c FILE, --recipe FILE, --config FILE" in flat
    train = " ".join(_help("train").split())
    assert "(default: 0, from aug.reprob)" in train and "--teacher NAME" not in train and "\nloss:" not in _help("train")


def test_a_fixed_choice_is_refused_in_one_line_a_registry_name_is_left_to_the_registry(capsys):
    assert main(["distill", "--precision", "bf61"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdkit distill: error: argument --precision") and "'bf16'" in err[0]
    assert main(["distill", "--on-nonfinite", "ignore"]) == 2
    assert "stop, skip" in capsys.readouterr().err
    assert main(["distill", "--teachr", "x"]) == 2
    assert "Did you mean '--teacher'" in capsys.readouterr().err
    args = build_parser().parse_args(["distill", "--loss", "my_plugin_loss", "--head", "my_head",
                                      "--preset", "function-matching", "--teacher-channels-last"])
    assert (args.loss, args.head, args.preset, args.teacher_channels_last) == ("my_plugin_loss", "my_head",
                                                                              "function_matching", "on")


def _recipe(verb: str, *argv: str):
    from importlib import import_module

    args = build_parser().parse_args([verb, *argv])
    return recipe_from_args(args, import_module(f"kdkit.cli.{verb}").FLAGS)


@pytest.mark.parametrize("flag,alias,value,key,expected", [
    ("--teacher", "--teacher-model", "resnet10t", "model.teacher", "resnet10t"),
    ("--student", "--model", "resnet10t", "model.student", "resnet10t"),
    ("--tau", "--kd-temperature", "2.5", "loss.tau", 2.5),
    ("--tau", "--distillation-tau", "2.5", "loss.tau", 2.5),
    ("--workers", "-j", "3", "data.workers", 3),
    ("--workers", "--num_workers", "3", "data.workers", 3),
    ("--data", "--data-dir", "/data/x", "data.path", "/data/x"),
    ("--data", "--data-path", "/data/x", "data.path", "/data/x"),
    ("--crop-pct", "--eval-crop-ratio", "0.9", "data.crop_pct", 0.9),
    ("--decay-rate", "--dr", "0.5", "optim.decay_rate", 0.5),
    ("--label-smoothing", "--smoothing", "0.2", "aug.label_smoothing", 0.2),
    ("--auto-augment", "--aa", "rand-m7", "aug.auto_augment", "rand-m7"),
    ("--repeated-aug", "--aug-repeats", "2", "aug.repeated_aug", 2),
    ("--grad-accum", "--grad-accum-steps", "4", "optim.grad_accum", 4),
    ("--name", "--experiment", "exp1", "run.name", "exp1"),
    ("--log-every", "--log-interval", "7", "run.log_every", 7),
    ("--keep-checkpoints", "--checkpoint-hist", "5", "run.keep_checkpoints", 5),
])
def test_timm_names_set_the_same_recipe_key(flag, alias, value, key, expected):
    section, leaf = key.split(".")
    for name in (flag, alias):
        got = getattr(getattr(_recipe("distill", name, value), section), leaf)
        assert got == expected and type(got) is type(expected), (name, got)


def test_config_and_c_read_the_same_recipe_as_recipe():
    file = tomllib.loads((ROOT / "kdkit" / "recipes" / "quickstart.toml").read_text())
    for opt in ("--recipe", "-c", "--config"):
        r = _recipe("distill", opt, "quickstart")
        assert (r.optim.epochs, r.model.student) == (file["optim"]["epochs"], file["model"]["student"]), opt


def test_b_is_per_process_and_batch_size_global(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _recipe("distill", "-b", "16").data.batch_size == 16
    monkeypatch.setenv("WORLD_SIZE", "4")  # what accelerate launch / torchrun set for 4 processes
    assert _recipe("distill", "-b", "16").data.batch_size == 64
    assert _recipe("train", "--batch-size-per-process", "16").data.batch_size == 64
    assert _recipe("distill", "--batch-size", "16").data.batch_size == 16
    with pytest.raises(KdkitError, match="give one"):
        _recipe("distill", "-b", "16", "--batch-size", "64")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(KdkitError, match="WORLD_SIZE"):
        _recipe("distill", "-b", "16")


def test_switches_and_values_land_on_their_keys():
    r = _recipe("distill", "--scale", "0.35", "1", "--strict", "--no-progress", "--logit-cache-cycle", "--compile",
                "--teacher-channels-last", "off", "--channels-last", "--preset", "none")
    assert r.aug.scale == (0.35, 1.0) and r.data.strict and not r.run.progress and r.model.logit_cache_cycle
    assert r.run.compile and r.run.teacher_channels_last == "off" and r.run.channels_last is True and r.preset == ""
    with pytest.raises(UsageError, match="unrecognized arguments: --loss"):
        build_parser().parse_args(["train", "--loss", "soft"])


def test_builtin_names_shown_cover_the_registries():
    from kdkit.cache.store import DTYPES
    from kdkit.cli.cache import DTYPES as CACHE_DTYPES
    from kdkit.losses import LOSSES
    from kdkit.losses.semi import PSEUDO_LABELS as SEMI
    from kdkit.models import HEADS

    assert set(LOSSES.names()) <= set(BUILTIN_LOSSES)
    assert set(HEADS.names()) <= set(BUILTIN_HEADS) - {"auto"}
    assert PSEUDO_LABELS == SEMI and set(CACHE_DTYPES) == set(DTYPES)


def _options(verb: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return [o for a in sub.choices[verb]._actions for o in a.option_strings]


def test_docs_name_every_flag_of_the_training_verbs():
    doc = (ROOT / "docs" / "cli.md").read_text()
    # each flag as code: `--tau`, `--tau FLOAT` or `--batch-size-per-process N`
    missing = {verb: [o for o in _options(verb) if o not in ("-h", "--help") and not re.search(f"`{o}[ `]", doc)]
               for verb in ("train", "distill", "cache")}
    assert not any(missing.values()), missing


def _script(shell: str, capsys) -> str:
    capsys.readouterr()
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def _complete(script: Path, *words: str) -> list[str]:
    """What the bash completion function offers for the command line `words` (the last is the one typed)."""
    line = " ".join(f"'{w}'" for w in words)
    code = f'source "{script}"; COMP_WORDS=({line}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); _kdkit; ' \
           'printf "%s\\n" "${COMPREPLY[@]}"'
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_bash_completion_is_valid_and_complete(capsys, tmp_path, monkeypatch):
    script = tmp_path / "kdkit.bash"
    script.write_text(_script("bash", capsys))
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _complete(script, "kdkit", "")[:len(VERBS)] == list(VERBS)
    assert _complete(script, "kdkit", "dis") == ["distill"]
    offered = set(_complete(script, "kdkit", "distill", "-"))
    assert set(_options("distill")) <= offered and "--kd-temperature" in offered
    assert _complete(script, "kdkit", "distill", "--precision", "") == ["auto", "no", "bf16", "fp16"]
    assert _complete(script, "kdkit", "distill", "--precision", "=", "b") == ["bf16"]
    assert _complete(script, "kdkit", "distill", "--loss", "d") == ["dkd", "dist"]
    assert _complete(script, "kdkit", "cache", "--mode", "") == ["replay", "fixed"]
    assert "quickstart" in _complete(script, "kdkit", "distill", "-c", "q")
    assert _complete(script, "kdkit", "completion", "") == ["bash", "zsh"]
    (tmp_path / "data_dir").mkdir()
    (tmp_path / "data_file").write_text("")
    monkeypatch.chdir(tmp_path)
    assert _complete(script, "kdkit", "distill", "--data", "data_") == ["data_dir"]
    assert sorted(_complete(script, "kdkit", "distill", "--teacher-weights", "data_")) == ["data_dir", "data_file"]
    assert _complete(script, "kdkit", "distill", "--epochs", "") == []


def test_zsh_completion_names_every_verb_and_flag(capsys):
    script = _script("zsh", capsys)
    assert script.startswith("#compdef kdkit")
    for verb in VERBS:
        assert f"\n        '{verb}:" in script and f"_kdkit_{verb}() {{" in script
    distill = script.split("_kdkit_distill() {")[1].split("\n}\n")[0]
    for option in _options("distill"):
        assert f"{option}[" in distill or f"{option}=" in distill or f"{option}+" in distill or \
            f"{option}," in distill or f"{option}}}" in distill, option
    assert "--precision=[" in distill and ":(auto no bf16 fp16)" in distill and ":_files -/" in distill


def test_the_old_names_of_the_logit_flags_keys_and_package_still_work(tmp_path):
    """--logits / --logits-cycle, model.logits(_args) / model.teacher_logits(_cycle) (flags, --set, recipe
    files, the Python API's settings) and `import kdkit.teachers` (with a DeprecationWarning) name what
    the new names name; a recipe written back uses the new keys."""
    from kdkit.api import recipe_from_settings
    from kdkit.config import load_recipe

    want = ("CACHE", True, "cache", {"tail": "mass"})
    r = _recipe("distill", "--logits", "CACHE", "--logits-cycle", "--set", "model.logits=cache", "--set",
                'model.logits_args={tail="mass"}')
    assert (r.model.logit_cache, r.model.logit_cache_cycle, r.model.logit_source, r.model.logit_source_args) == want
    old = tmp_path / "old.toml"
    old.write_text('[model]\nteacher_logits = "CACHE"\nteacher_logits_cycle = true\nlogits = "cache"\n'
                   'logits_args = { tail = "mass" }\n')
    r = load_recipe(old)
    assert (r.model.logit_cache, r.model.logit_cache_cycle, r.model.logit_source, r.model.logit_source_args) == want
    model = tomllib.loads(r.to_toml())["model"]
    assert model["logit_cache"] == "CACHE" and not {"teacher_logits", "logits", "logits_args"} & set(model)
    r = recipe_from_settings(teacher_logits="CACHE", teacher_logits_cycle=True, logits="cache",
                             logits_args={"tail": "mass"})
    assert (r.model.logit_cache, r.model.logit_cache_cycle, r.model.logit_source, r.model.logit_source_args) == want
    code = ("import warnings\nwith warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    import kdkit.teachers as t\nfrom kdkit.sources import CachedLogits, SourceContext\n"
            "assert t.RunPieces is SourceContext and t.CachedLogits is CachedLogits\n"
            "print([str(x.message) for x in w if x.category is DeprecationWarning])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kdkit.teachers is now kdkit.sources" in out.stdout

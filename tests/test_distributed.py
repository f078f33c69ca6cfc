"""Two processes on CPU (gloo, through `accelerate launch`) give what one process gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.cache.store import mmap_safetensors
from tests.helpers import STUDENT, run_args, run_kdkit, step_terms


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory, tiny_data) -> Path:
    """The tiny set with 59 test images: not divisible by 2 processes."""
    root = tmp_path_factory.mktemp("odd") / "data"
    shutil.copytree(tiny_data, root)
    sorted((root / "test" / "truck").iterdir())[0].unlink()
    return root




def test_two_processes_train_the_one_process_model_and_evaluate_exactly(tmp_path, odd_data, teacher_dir):
    for n in (1, 2):
        run_kdkit(n, "distill", *run_args(odd_data, teacher_dir), "--output", tmp_path, "--name", f"p{n}")
    one, two = step_terms(tmp_path / "p1"), step_terms(tmp_path / "p2")
    summary = json.loads((tmp_path / "p2" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch_size"] == 16
    assert len(one) == len(two) == 14
    # Same global batches; the gradient all-reduce sums in another order than one process does,
    # so results agree to float32 rounding (measured: 2e-7 on losses, 1e-7 on weights)
    for a, b in zip(one, two, strict=True):
        for term in ("loss", "task", "kd"):
            assert abs(a[term] - b[term]) <= 1e-5, (a["step"], term)
    w1, w2 = (load_file(tmp_path / p / "student" / "model.safetensors") for p in ("p1", "p2"))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0) for k in w1)
    # evaluation over 59 images: Accelerate pads the second process's share; the padding is dropped
    evals = [json.loads(run_kdkit(n, "eval", "--weights", tmp_path / "p1" / "student", "--data", odd_data,
                              "--workers", "0", "--batch-size", "8", "--json").stdout.strip().splitlines()[-1])
             for n in (1, 2)]
    assert evals[0]["n"] == evals[1]["n"] == 59
    assert {k: v for k, v in evals[0].items() if "top" in k} == {k: v for k, v in evals[1].items() if "top" in k}


def test_a_cache_written_by_two_processes_equals_one_written_by_one(tmp_path, odd_data, teacher_dir):
    for n in (1, 2):
        run_kdkit(n, "cache", *run_args(odd_data, teacher_dir), "--shard-size", "16", "--out", tmp_path / f"c{n}")
    a, b = (sorted((tmp_path / f"c{n}" / "shards").iterdir()) for n in (1, 2))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2 * 8  # 2 epochs x ceil(120 / 16)
    for x, y in zip(a, b, strict=True):  # (safetensors orders a header's metadata keys at random)
        (tx, mx), (ty, my) = mmap_safetensors(x), mmap_safetensors(y)
        assert mx == my and tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)
    m1, m2 = (json.loads((tmp_path / f"c{n}" / "manifest.json").read_text()) for n in (1, 2))
    assert m1 == m2


# ---- sharded training: refused in one line, before anything is written -------------------------

FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
use_cpu: false
"""


@pytest.mark.parametrize(("env", "name"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_and_deepspeed_are_refused_before_anything_is_written(env, name, tmp_path, tiny_data, teacher_dir,
                                                                    monkeypatch, capsys):
    """On CPU Accelerate ignores FSDP (it shards on accelerators only) and DeepSpeed: a run would
    go on unsharded, or, on GPUs, write raw shards. kdkit refuses both, as `accelerate launch
    --use_fsdp / --use_deepspeed` asks for them (ACCELERATE_USE_*), from the CLI and the Python API."""
    from kdkit.registry import KdkitError
    from tests.helpers import run_cli

    monkeypatch.setenv(env, "true")
    args = ["distill", *STUDENT, "--teacher", "resnet10t", "--teacher-weights", teacher_dir, "--data", tiny_data,
            "--output", tmp_path / "runs", "--epochs", "1", "--workers", "0"]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"kdkit does not train under {name} ({env}=true" in err
    assert "accelerate launch --multi_gpu" in err and "Traceback" not in err
    import kdkit

    with pytest.raises(KdkitError, match=f"kdkit does not train under {name}"):
        kdkit.train("resnet10t", tiny_data, output=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_an_fsdp2_accelerate_config_file_is_refused_in_one_line(tmp_path, tiny_data):
    """The user's way: `accelerate launch --config_file fsdp.yaml -m kdkit distill ...` with the
    FSDP2 config that `accelerate config` writes."""
    (tmp_path / "fsdp.yaml").write_text(FSDP2_CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"), "-m",
           "kdkit", "distill", *map(str, STUDENT), "--teacher", "resnet10t", "--data", str(tiny_data), "--output",
           str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("kdkit distill: error:")]
    assert len(ours) == 1 and "kdkit does not train under FSDP (ACCELERATE_USE_FSDP=true" in ours[0], done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_accelerator_of_the_callers_that_shards_is_refused_by_fit():
    from accelerate.utils import DistributedType

    from kdkit.accelerator import check_not_sharded
    from kdkit.registry import KdkitError

    for kind, name in ((DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")):
        with pytest.raises(KdkitError, match=f"kdkit does not train under {name} \\(the Accelerator\\)"):
            check_not_sharded(kind)
    check_not_sharded(DistributedType.MULTI_GPU)
    check_not_sharded(DistributedType.NO)


def test_a_launch_that_starts_one_process_says_so(tmp_path, tiny_data, teacher_dir):
    """`accelerate launch --cpu --num_processes 2` takes Accelerate's simple launcher, which runs one
    process: the run is a correct one-process run, and one line says that it is not the two asked for."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kdkit", "distill",
           *map(str, run_args(tiny_data, teacher_dir)), "--epochs", "1", "--output", str(tmp_path), "--name", "lone"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    err = " ".join(done.stderr.split())  # the console wraps lines
    assert err.count("note: accelerate launch started 1 process, not the --num_processes asked for") == 1, err
    assert "accelerate launch --multi_gpu --num_processes N, without --cpu" in err
    assert ", 1 process -> " in err  # the run header
    assert json.loads((tmp_path / "lone" / "summary.json").read_text())["processes"] == 1


def test_the_lone_launch_note_reads_what_the_launchers_set():
    from kdkit.accelerator import lone_launch_note

    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert lone_launch_note(1, simple) is not None
    assert lone_launch_note(1, {"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1: as asked
    assert lone_launch_note(1, {**simple, "WORLD_SIZE": "1"}) is None  # torchrun with one process
    assert lone_launch_note(2, {**simple, "WORLD_SIZE": "2"}) is None
    assert lone_launch_note(1, {}) is None  # no launcher

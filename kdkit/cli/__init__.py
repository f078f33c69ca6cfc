"""The `kdkit` command: one sub-command per verb; a user's mistake prints one line and exits 2."""

from __future__ import annotations

import argparse
import os
import sys

from kdkit.registry import KdkitError

VERBS = ("train", "distill", "cache", "eval", "compare", "benchmark", "export", "push", "plot", "quickstart",
         "recipes")


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation for image classifiers "
                                     "(the DeiT recipe for any timm teacher and student).")
    from kdkit import __version__

    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    parser.add_argument("--plugin", metavar="MODULE", action="append",
                        help="import MODULE (a module name or a .py file) that registers losses, heads or logit "
                             "sources, before the verb runs (repeatable; also accepted after the verb). Installed "
                             "packages register through the `kdkit.plugins` entry-point group instead")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        import_module(f"kdkit.cli.{verb}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kdkit.plugins import load_plugins, split_plugin_args

    try:
        plugins, argv = split_plugin_args(list(sys.argv[1:] if argv is None else argv))
    except KdkitError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("RANK", "0") != "0":
        # under a launcher (accelerate launch, torchrun) every process runs the verb; results are
        # printed once, by process 0 (errors still reach stderr from any process)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        load_plugins(plugins)  # strategies of other packages (entry points) and --plugin modules
        return int(args.func(args) or 0)
    except KdkitError as e:
        print(f"kdkit {args.verb}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdkit {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()


def close_process_group() -> None:
    """Under a launcher, shut the process group down before exit: left to interpreter teardown,
    gloo's threads can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def one_line(e: KdkitError) -> str:
    """The error's message. torch re-raises an error from a data-loader worker in the main process
    with the worker's traceback as its message: keep its last line, and say where it came from."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    where = text.split("\n", 1)[0].removeprefix("Caught KdkitError ").rstrip(".")
    return f"{text.rstrip().splitlines()[-1].removeprefix('kdkit.registry.KdkitError: ')} ({where})"

"""The `kdkit` command: one sub-command per verb; a user's mistake prints one line and exits 2.

Building the parser imports no torch, timm, accelerate or datasets (each verb imports what it needs
when it runs), so that `kdkit --help`, `kdkit VERB --help` and a usage error answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from kdkit.registry import KdkitError, suggest

VERBS = ("train", "distill", "cache", "plan", "shards", "eval", "compare", "benchmark", "export", "push", "plot",
         "quickstart", "recipes", "completion")


class UsageError(KdkitError):
    """A command line argparse refuses; its message is the whole line `main` prints."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage mistake raised as UsageError (one line, with a suggestion for a
    misspelt choice) instead of the usage text and sys.exit(2): `main` prints it and returns 2.
    No prefix abbreviations (allow_abbrev=False), for this parser and the verbs' (add_subparsers
    builds them with this class): timm's --drop must not become --drop-path, nor --model-ema
    ambiguous."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        hint = suggest(m.group(1), re.findall(r"'([^']*)'", m.group(2))) if m else ""
        raise UsageError(f"{self.prog}: error: {message}{'.' + hint if hint else ''} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse reports a verb's unknown flag from the top parser; name the verb, and the closest flag
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = next((a.choices[ns.verb] for a in self._actions if isinstance(a, argparse._SubParsersAction)
                        and getattr(ns, "verb", None) in a.choices), self)
            flags = [o for a in sub._actions for o in a.option_strings]
            hint = suggest(extras[0].split("=")[0], flags) if extras[0].startswith("-") else ""
            sub.error(f"unrecognized arguments: {' '.join(extras)}{'.' + hint if hint else ''}")
        return ns


class _VerbsFormatter(argparse.HelpFormatter):
    """One line per verb in `kdkit --help`: argparse measures the verbs' names at the section's indent
    but prints them 2 columns deeper, which pushes the help of the longer ones to a line of its own."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            longest = max(map(len, action.choices), default=0)
            self._action_max_length = max(self._action_max_length, longest + self._current_indent + 2)


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    from kdkit.version import __version__

    parser = Parser(prog="kdkit", description="Knowledge distillation for image classifiers (the DeiT recipe for "
                    "any timm teacher and student).", epilog="`kdkit VERB --help` lists a verb's flags, grouped, "
                    "with their defaults and recipe keys. Shell completion: `kdkit completion bash` or "
                    "`kdkit completion zsh` (docs/cli.md).", formatter_class=_VerbsFormatter)
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    parser.add_argument("--plugin", metavar="MODULE", action="append",
                        help="import MODULE (a module name or a .py file) that registers losses, heads or logit "
                             "sources, before the verb runs (repeatable; also accepted after the verb). Installed "
                             "packages register through the `kdkit.plugins` entry-point group instead")
    sub = parser.add_subparsers(dest="verb", required=True, title="verbs", metavar="VERB")
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
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        # under a launcher (accelerate launch, torchrun) every process runs the verb; results are
        # printed once, by process 0 (errors still reach stderr from any process)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        load_plugins(plugins)  # strategies of other packages (entry points) and --plugin modules
        return int(args.func(args) or 0)
    except KdkitError as e:
        print(f"kdkit {args.verb}: error: {one_line(e)}", file=sys.stderr)
        accelerator = sys.modules.get("kdkit.accelerator")  # loaded by then if the error is its
        if accelerator is not None and isinstance(e, accelerator.PeerFailure):  # the group is broken
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"kdkit {args.verb}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        accelerator = sys.modules.get("kdkit.accelerator")
        if accelerator is not None and isinstance(e, accelerator.Stopped):  # SIGTERM: its line is out
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(e.code))
        raise
    finally:
        close_process_group()


def close_process_group() -> None:
    """Under a launcher, shut the process group down before exit: left to interpreter teardown,
    gloo's threads can abort the process ("terminate called without an active exception")."""
    if "torch.distributed" not in sys.modules:
        return  # no verb that ran started one (and `kdkit recipes` need not import torch to find out)
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

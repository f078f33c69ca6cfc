"""kdkit completion: a bash or zsh completion script, generated from kdkit's own parser.

The script is static: verbs, each verb's flags, the choices of a flag with a fixed set, the built-in
names of a plugin-extensible one (--loss, --head), bundled recipe names, and file or folder
completion for FILE / DIR values. It needs nothing at run time and answers a TAB without starting
Python (argcomplete would run kdkit's parser on every TAB, and add a dependency); regenerate it
after upgrading kdkit.

Why not shtab, which also writes static scripts from an argparse parser: its bash script does not
complete a value typed as `--flag=value` (bash splits the word at '='), offers nothing for the
plugin-extensible flags (--loss, --head take names beyond fixed choices) unless fed shell functions
written by hand, and reads each action's `complete` attribute as its own; generating the same
script through it would take more code than this module, not less.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

EPILOG = """install:
  bash:  kdkit completion bash > ~/.local/share/bash-completion/completions/kdkit
         (or add `eval "$(kdkit completion bash)"` to ~/.bashrc)
  zsh:   kdkit completion zsh > ~/.zfunc/_kdkit   with `fpath=(~/.zfunc $fpath)` before `compinit` in ~/.zshrc
         (or add `source <(kdkit completion zsh)` after `compinit`)
Start a new shell; run the command again after upgrading kdkit.
"""

SHELLS = ("bash", "zsh")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print a bash or zsh completion script for kdkit", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli import build_parser

    print(bash_script(build_parser()) if args.shell == "bash" else zsh_script(build_parser()), end="")
    return 0


@dataclasses.dataclass
class Arg:
    """One argument of a verb as completion sees it."""

    names: list[str]  # option strings; empty for a positional
    help: str
    values: int | str  # values it takes: 0 (a switch), a count, or "?" (an optional one)
    words: list[str]  # what its value can be (choices, built-in names, bundled recipes)
    paths: str  # "dir", "file" or "" (what else its value can be)
    metavar: str
    repeat: bool = False


def _arg(action: argparse.Action) -> Arg:
    words = action.choices if action.choices is not None else getattr(action, "complete", ())
    words = list(words() if callable(words) else words)
    metavar = action.metavar if action.metavar is not None else action.dest.upper()
    first = metavar[0] if isinstance(metavar, tuple) else metavar
    paths = "dir" if first.endswith("DIR") else "file" if first in ("FILE", "PATH", "MODEL") else ""
    if action.nargs == 0:
        values: int | str = 0
    elif action.nargs in (None, "?"):
        values = 1 if action.nargs is None else "?"
    else:
        values = action.nargs if isinstance(action.nargs, int) else 1
    if isinstance(metavar, tuple):
        label = "/".join(metavar)
    else:  # a metavar listing the names ({none,soft,...}) is labelled by the flag's own name
        label = action.dest if metavar.startswith("{") else metavar
    text = (action.help or "").replace("%%", "%").split(" (default")[0]
    return Arg(list(action.option_strings), text, values, [str(w) for w in words], paths, label,
               isinstance(action, argparse._AppendAction))


def describe(parser: argparse.ArgumentParser) -> tuple[list[Arg], dict[str, tuple[str, list[Arg]]]]:
    """The top-level options, and for each verb its one-line help and its arguments, in parser order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    top = [_arg(a) for a in parser._actions if a.option_strings]
    return top, {verb: (helps.get(verb, ""), [_arg(a) for a in p._actions]) for verb, p in sub.choices.items()}


# ---- bash

def _bash_value(arg: Arg) -> str:
    parts = []
    if arg.paths:
        parts.append(f"_kdkit_paths {arg.paths}")
    if arg.words:
        parts.append(f'_kdkit_words "{" ".join(arg.words)}"')
    return "; ".join(parts) or ":"


def bash_script(parser: argparse.ArgumentParser) -> str:
    from kdkit.version import __version__

    top, verbs = describe(parser)
    cases = []
    for verb, (_, args) in verbs.items():
        options = [a for a in args if a.names]
        positional = [w for a in args if not a.names for w in a.words]
        lines = []
        for a in options:
            if a.values == 0:
                continue
            then = _bash_value(a)
            if a.values == "?":  # a bare flag is fine too: offer the next flags as well
                then = f'{then}; _kdkit_words "$flags"'
            lines.append(f"                {'|'.join(a.names)}) {then}; return ;;")
        flags = " ".join(n for a in options for n in a.names)
        values = f"""            case "$prev" in\n{chr(10).join(lines)}\n            esac\n""" if lines else ""
        # a verb with a positional (recipes NAME, completion SHELL) offers its words unless a flag is typed
        last = (f'if [[ "$cur" == -* ]]; then _kdkit_words "$flags"; else _kdkit_words "{" ".join(positional)}"; fi'
                if positional else '_kdkit_words "$flags"')
        cases.append(f"""        {verb})
            flags="{flags}"
{values}            {last} ;;""")
    top_words = " ".join([*verbs, *(n for a in top for n in a.names)])
    return f"""# bash completion for kdkit {__version__}, generated by `kdkit completion bash` from kdkit's parser.
# Install: kdkit completion bash > ~/.local/share/bash-completion/completions/kdkit
#      or: eval "$(kdkit completion bash)" in ~/.bashrc. Regenerate after upgrading kdkit.

_kdkit_words() {{
    COMPREPLY+=($(compgen -W "$1" -- "$cur"))
}}

_kdkit_paths() {{
    compopt -o filenames 2>/dev/null
    local IFS=$'\\n'
    if [[ "$1" == dir ]]; then
        COMPREPLY+=($(compgen -d -- "$cur"))
    else
        COMPREPLY+=($(compgen -f -- "$cur"))
    fi
}}

_kdkit() {{
    local cur prev verb flags i
    COMPREPLY=()
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    # --flag=value: bash splits the word at '='
    if [[ "$cur" == "=" ]]; then
        cur=""
    elif [[ "$prev" == "=" ]]; then
        prev="${{COMP_WORDS[COMP_CWORD-2]}}"
    fi
    verb=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ "${{COMP_WORDS[i]}}" != -* ]]; then
            verb="${{COMP_WORDS[i]}}"
            break
        fi
    done
    case "$verb" in
        "") _kdkit_words "{top_words}" ;;
{chr(10).join(cases)}
    esac
}}

complete -F _kdkit kdkit
"""


# ---- zsh

def _zq(text: str) -> str:
    """`text` for inside a single-quoted _arguments spec's [description]."""
    return text.replace("`", "").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zsh_action(arg: Arg) -> str:
    if arg.words and not arg.paths:
        return "(" + " ".join(arg.words) + ")"
    if arg.words:  # a file or a bundled name
        # _arguments splits its specs at ':', so the inner specs' colons are escaped
        return '_alternative "files\\:file\\:_files" "names\\:name\\:(' + " ".join(arg.words) + ')"'
    return {"dir": "_files -/", "file": "_files"}.get(arg.paths, " ")


def _zsh_spec(arg: Arg) -> str:
    desc = _zq(textwrap.shorten(arg.help, 90, placeholder="..."))
    if not arg.names:
        action = _zsh_action(arg)
        return f"'{':' if arg.values == '?' else ''}:{_zq(arg.metavar.lower())}:{action}'"
    value = ""
    if arg.values == "?":
        value = f"::{_zq(arg.metavar)}:{_zsh_action(arg)}"
    elif arg.values:
        metavars = arg.metavar.split("/") if "/" in arg.metavar else [arg.metavar] * int(arg.values)
        value = "".join(f":{_zq(m)}:{_zsh_action(arg)}" for m in metavars)
    suffix = "" if not arg.values else "="
    names = [n + (suffix if n.startswith("--") else "+" if arg.values else "") for n in arg.names]
    star = "*" if arg.repeat else ""
    if len(names) == 1:
        return f"'{star}{names[0]}[{desc}]{value}'"
    return f"'{star}({' '.join(arg.names)})'{{{','.join(names)}}}'[{desc}]{value}'"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    from kdkit.version import __version__

    top, verbs = describe(parser)
    functions, cases, entries = [], [], []
    for verb, (text, args) in verbs.items():
        specs = " \\\n    ".join(_zsh_spec(a) for a in args)
        functions.append(f"_kdkit_{verb}() {{\n  _arguments \\\n    {specs}\n}}\n")
        cases.append(f"        {verb}) _kdkit_{verb} ;;")
        entries.append(f"        '{verb}:{_zq(text)}'")
    top_specs = " \\\n    ".join(f"'(- : *)'{{{','.join(a.names)}}}'[{_zq(a.help)}]'" if len(a.names) > 1
                                 else f"'(- : *){a.names[0]}[{_zq(a.help)}]'" for a in top)
    return f"""#compdef kdkit
# zsh completion for kdkit {__version__}, generated by `kdkit completion zsh` from kdkit's parser.
# Install: kdkit completion zsh > ~/.zfunc/_kdkit, with fpath=(~/.zfunc $fpath) before compinit in ~/.zshrc
#      or: source <(kdkit completion zsh) after compinit. Regenerate after upgrading kdkit.

{chr(10).join(functions)}
_kdkit() {{
  local curcontext="$curcontext" state line
  _arguments -C \\
    {top_specs} \\
    '1: :->verb' \\
    '*:: :->args'
  case $state in
    verb)
      local -a verbs
      verbs=(
{chr(10).join(entries)}
      )
      _describe -t verbs 'kdkit verb' verbs ;;
    args)
      curcontext="${{curcontext%:*:*}}:kdkit-$line[1]:"
      case $line[1] in
{chr(10).join(cases)}
      esac ;;
  esac
}}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
  _kdkit "$@"
else
  compdef _kdkit kdkit
fi
"""

"""One small generic registry: strategies are chosen by name, unknown names get a suggestion, and a
strategy's own settings are checked against its constructor's signature."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class KdkitError(Exception):
    """A user's mistake (bad name, bad file, bad value): the CLI prints the message and exits non-zero."""


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Lazy:
    """A value computed only if a constructor asks for it (a teacher that a cached run never builds)."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """The keyword-passable parameters of `fn` (of `__init__` for a class), without self/cls."""
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call_with(fn: Callable[..., T], settings: dict[str, Any] | None, where: str, provided: dict[str, Any]) -> T:
    """`fn(**settings, **the provided values it names)`.

    settings: the user's own settings of this strategy (a recipe's `[loss.args]`); each must be a
    parameter of `fn`, else KdkitError naming it and the closest valid one. provided: what the run
    offers (`num_classes`, `model`, shared recipe settings, ...); a value is passed only when `fn`
    names it, and a `Lazy` one is computed only then. `where` names the settings in messages.
    """
    params = check_settings(fn, settings, where, provided)
    kwargs = {k: (v.make() if isinstance(v, Lazy) else v) for k, v in provided.items() if k in params}
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs and n not in (settings or {})]
    if missing:
        raise KdkitError(f"{where} needs {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} "
                         f"as settings ({where}.{missing[0]} = ...)")
    return fn(**kwargs, **(settings or {}))


def check_settings(fn: Callable, settings: dict[str, Any] | None, where: str,
                   provided: dict[str, Any] | tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """KdkitError for a setting `fn` does not take (naming the closest) or one the run provides;
    returns `fn`'s parameters."""
    params = parameters(fn)
    own = [n for n in params if n not in provided]
    for key in settings or {}:
        if key not in params:
            valid = f" Valid: {', '.join(own)}" if own else f" {where} takes no settings of its own"
            raise KdkitError(f"unknown setting {where}.{key}.{suggest(key, own)}{valid}")
        if key in provided:
            raise KdkitError(f"{where}.{key}: this value comes from the run (set it where the run takes it, "
                             f"e.g. the [loss] section or the command line), not as a strategy setting")
    return params


class Registry(Generic[T]):
    """Maps names to strategies (classes, usually).

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("soft")
    ... class SoftDistillationLoss: ...
    >>> LOSSES.get("soft")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KdkitError(
                f"unknown {self.kind} {name!r}.{suggest(name, self.names())} Choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def create(self, name: str, settings: dict[str, Any] | None = None, **provided: Any) -> Any:
        """Build strategy `name` with its own `settings` (checked against the constructor's signature)
        and the `provided` values its constructor names (see `call_with`)."""
        return call_with(self.get(name), settings, f"{self.kind} {name!r}", provided)

    def name_of(self, obj: object) -> str:
        """The name `obj`'s class is registered under."""
        for name, entry in self._entries.items():
            if entry is type(obj):
                return name
        raise KeyError(f"{type(obj).__name__} is not a registered {self.kind}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

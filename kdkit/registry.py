"""One small generic registry: strategies are chosen by name, unknown names get a suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class KdkitError(Exception):
    """A user's mistake (bad name, bad file, bad value): the CLI prints the message and exits non-zero."""


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """Maps names to factories (usually classes).

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

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

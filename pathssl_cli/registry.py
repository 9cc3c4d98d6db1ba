"""A small name → object registry shared by backbones, SSL methods and datasets.

Adding an entry is one decorator line; a duplicate name is a programming error, and an unknown name is a user
error that lists the valid names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from pathssl_cli.errors import SpecError

T = TypeVar("T")


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most similar to `name`, or None when nothing is close enough to suggest."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return matches[0] if matches else None


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hint = closest(name, self.names())
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        return f"unknown {self.kind} {name!r}.{did_you_mean} Valid names: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

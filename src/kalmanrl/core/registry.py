"""One registry type for every pluggable part a config names: advantage estimators, ratio transforms, surrogates,
rewards, prompt templates, dataset loaders and experiment trackers. They behave alike: a name registers once, an
unknown name or parameter fails with one error type that lists the known ones, and parameters are checked against the
registered function's (or class's) keyword parameters when they are bound, so config validation can refuse a bad one
before any job runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_MISSING = object()


class RegistryError(ValueError):
    """A registry was asked for something it does not hold, or to hold a name twice."""


class UnknownNameError(RegistryError, KeyError):
    """No entry of that name; the message lists the known ones. A KeyError too, as a lookup failure."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(RegistryError):
    """A name registered twice (a second registration would silently replace the first)."""


class ParameterError(RegistryError):
    """Parameters the entry does not take, or required ones missing; the message lists the known ones."""


class Registry(Generic[T]):
    """Named entries of one `kind` ("advantage estimator", "reward", ...). `register(name)` is a decorator, or
    `register(name, entry)` a call; `get(name)` looks one up; `bind(name, params)` checks the params and returns the
    entry with them fixed (a class is instantiated; a function becomes a partial). Keyword arguments of `register`
    are traits of the entry that its users ask about (`trait(name, key)`), e.g. whether a surrogate is per sequence."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, entry: Any = _MISSING, **traits: Any) -> Any:
        def add(entry: T) -> T:
            if name in self._entries:
                raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            self._traits[name] = traits
            return entry

        return add if entry is _MISSING else add(entry)

    def unregister(self, name: str) -> T:
        """Remove an entry (for tests that register a temporary one)."""
        self.get(name)
        del self._traits[name]
        return self._entries.pop(name)

    def trait(self, name: str, key: str, default: Any = None) -> Any:
        """A trait the entry `name` was registered with, or `default`."""
        self.get(name)
        return self._traits[name].get(key, default)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})") from None

    def parameters(self, name: str) -> tuple[list[str], list[str]] | None:
        """(keyword parameters, the required ones among them) of the entry, or None when it takes any (or is not
        callable). A class's parameters are its __init__'s, followed up the MRO while __init__ passes **kwargs on."""
        entry = self.get(name)
        if inspect.isclass(entry):
            functions = [cls.__dict__["__init__"] for cls in entry.__mro__ if "__init__" in cls.__dict__
                         and cls is not object]
        elif callable(entry):
            functions = [entry]
        else:
            return None
        known, required = [], []
        for fn in functions:
            signature = inspect.signature(fn)
            for p in signature.parameters.values():
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in known:
                    known.append(p.name)
                    if p.default is inspect.Parameter.empty:
                        required.append(p.name)
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
                return known, required
        return None  # every function on the way passes **kwargs on: anything goes

    def check_params(self, name: str, params: Mapping[str, Any]) -> None:
        """Refuse parameters `name` does not take, and required ones that are missing."""
        signature = self.parameters(name)
        if signature is None:
            return
        known, required = signature
        if unknown := sorted(set(params) - set(known)):
            raise ParameterError(f"{self.kind} {name!r} got unknown parameter{'s' * (len(unknown) > 1)} "
                                 f"{', '.join(map(repr, unknown))} (known: {', '.join(known) or 'none'})")
        if missing := [p for p in required if p not in params]:
            raise ParameterError(f"{self.kind} {name!r} needs parameter{'s' * (len(missing) > 1)} "
                                 f"{', '.join(map(repr, missing))}")

    def bind(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        """The entry with `params` checked and fixed: a class instantiated with them, a function as a partial."""
        params = dict(params or {})
        entry = self.get(name)
        self.check_params(name, params)
        if inspect.isclass(entry):
            return entry(**params)
        return functools.partial(entry, **params) if params else entry


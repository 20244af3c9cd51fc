"""Registries of components by name: each kind (likelihood, prior, posterior, objective,
activation, network preset) keeps one in its own module, and `config` reads them to list and
check the choices. No component module imports `config`: the option declarations take a
registry itself as their choices, so a name registered later (by a plugin) is accepted too.

    PRIORS = Registry("prior")

    @PRIORS.register("mog")
    class MixtureOfGaussians(Prior): ...

A component from outside vaelab registers the same way, from its own module; `vaelab train
--plugin MODULE` imports that module (`import_plugins`) before the options are read, and
config.json records it so that the commands that load the run import it again.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Iterable, TypeVar

from .errors import VaelabError

T = TypeVar("T")


class Registry(dict):
    """Names -> components of one kind, in the order they were registered (the order the
    command line and its errors list them)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, component: Any = None) -> Callable[[T], T] | Any:
        """Add component under name; without component, a decorator that adds what it wraps.
        A name taken already is an error (a second registration would change old runs)."""
        def add(component: T) -> T:
            if self.get(name, component) is not component:
                raise VaelabError(f"a {self.kind} named {name!r} is registered already")
            self[name] = component
            return component

        return add if component is None else add(component)

    def __getitem__(self, name: str) -> Any:
        if name not in self:
            raise VaelabError(self.unknown(name))
        return super().__getitem__(name)

    def unknown(self, name: Any) -> str:
        """The one-line error for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; choose one of {', '.join(map(str, self))}"


def plugin_names(values: Iterable[str]) -> tuple[str, ...]:
    """Module names from --plugin values, each one name or several separated by commas."""
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def import_plugins(names: Iterable[str]) -> None:
    """Import each plugin module, which registers its components as it is imported. The current
    directory is searched after sys.path (where `vaelab`, a console script, does not put it),
    so a module beside the user's data is found and never shadows an installed one."""
    names = plugin_names(names)
    if names and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure of someone else's module: one line, not a traceback
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            raise VaelabError(f"plugin {name!r} failed to import ({why})") from e

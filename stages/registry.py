"""One name -> builder registry mechanism for every pluggable part of the pipeline (after
timm's ``_registry.py``): encoders, dataset readers, classifiers, segmentation heads.

Each kind has one ``Registry`` instance, defined in a module that imports no
implementation (``stages/encoders/registry.py``, ``stages/datasets/registry.py``,
``stages/models/registry.py``, ``stages/models/heads/registry.py``). Implementation
modules import that module and decorate their builders; the package ``__init__`` imports
the implementations so that they register. Because this module and the per-kind registry
modules import nothing that registers, registering can never form an import cycle.

    MODELS = Registry("model")

    @MODELS.register()              # or @MODELS.register, or @MODELS.register("sam-head")
    def sam_head(**kw): ...

    MODELS.create("sam-head", num_classes=2)    # "-" and "_" are the same name
    MODELS.names("sam*")                        # registration order, fnmatch pattern

Names are kept in the spelling they were registered with (``acdc-h5``, ``sam2_hiera_b+``,
``sam_head``); lookups go through ``canonical`` so a user may type ``-`` or ``_``
(``sam-head`` == ``sam_head``). An unknown name raises the registry's error type (a
``ValueError``; ``EncoderError`` / ``DatasetError`` for those kinds) listing the choices,
so the CLI's error handler prints it as one line.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

B = TypeVar("B", bound=Callable)


class UnknownNameError(ValueError):
    """A name no registry entry has (the message lists the choices)."""


def normalize(name: str) -> str:
    """The lookup key of a spelling: ``-`` and ``_`` are the same character."""
    return name.replace("-", "_")


class Registry(Generic[B]):
    """Name -> builder for one kind of component.

    Args:
        kind: what an entry is, for messages ("encoder", "segmentation head").
        error: the exception type raised for an unknown name (a ValueError subclass).
        choices_label: the words before the list of names in that message.

    Iterating yields the registered names in registration order, ``len`` counts them and
    ``registry[name]`` is ``get(name)``, so the registry reads like the dict it replaces.
    """

    def __init__(self, kind: str, error: type[ValueError] = UnknownNameError,
                 choices_label: str = "choose one of") -> None:
        self.kind = kind
        self.error = error
        self.choices_label = choices_label
        self._builders: dict[str, B] = {}  # normalized key -> builder
        self._names: dict[str, str] = {}  # normalized key -> registered spelling

    def register(self, name: str | B | None = None) -> Callable[[B], B] | B:
        """Decorator registering a builder under ``name`` (default: the function's name).

        Usable bare (``@reg.register``) or called (``@reg.register()``,
        ``@reg.register("acdc-h5")``). Registering another builder under a name already
        taken raises ValueError (two modules claiming one name is a bug); the same builder
        again (a module reloaded) replaces the entry."""
        if callable(name):
            return self._add(name.__name__, name)

        def deco(fn: B) -> B:
            return self._add(name or fn.__name__, fn)

        return deco

    def _add(self, name: str, fn: B) -> B:
        key = normalize(name)
        old = self._builders.get(key)
        if old is not None and _origin(old) != _origin(fn):
            raise ValueError(f"{self.kind} {name!r} is registered twice ({_origin(old)} and {_origin(fn)}); "
                             "rename one of them")
        self._builders[key] = fn
        self._names[key] = name
        return fn

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (``sam-head`` -> ``sam_head``); a name that is
        not registered comes back normalized (``-`` -> ``_``)."""
        key = normalize(name)
        return self._names.get(key, key)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the fnmatch ``pattern``, in registration order."""
        return [n for n in self._names.values() if fnmatch.fnmatchcase(n, pattern)]

    def unknown(self, name: str) -> ValueError:
        """The error for a name not in the registry, listing the choices."""
        return self.error(f"unknown {self.kind} {name!r}; {self.choices_label}: {', '.join(self.names())}")

    def get(self, name: str) -> B:
        """The builder registered as ``name``; raises ``self.error`` when there is none."""
        try:
            return self._builders[normalize(name)]
        except (KeyError, AttributeError):
            raise self.unknown(name) from None

    def create(self, name: str, *args, **kwargs):
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalize(name) in self._builders

    def __getitem__(self, name: str) -> B:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names.values()))

    def __len__(self) -> int:
        return len(self._builders)

    def items(self) -> list[tuple[str, B]]:
        return [(self._names[k], fn) for k, fn in self._builders.items()]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _origin(fn: Callable) -> str:
    """Where a builder is defined; a ``functools.partial`` counts as its function + arguments."""
    func = getattr(fn, "func", fn)
    args = getattr(fn, "args", ())
    where = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
    return where + (repr(args) if args else "")

"""The models the demo offers in its picker: each loaded on first use and kept, with its own lock
(engines install attention processors on the model's network, so edits on one model never
interleave; edits on two models may run side by side). A request names a model only by the
picker's names: the server never loads a path a request gives."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SpdinvError
from ..model import DiffusionModel


@dataclass
class OfferedModel:
    """One picker entry: how to load it, the model once loaded, and the lock its edits hold."""

    name: str
    load: Callable[[], DiffusionModel]
    model: DiffusionModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by each edit on this model
    loading: threading.Lock = field(default_factory=threading.Lock)  # one load at a time

    def loaded(self) -> DiffusionModel:
        """The model, loaded now if this is its first use; a failure is a one-line SpdinvError (and
        the next use tries again)."""
        if self.model is not None:
            return self.model
        with self.loading:
            if self.model is None:
                self.model = _load(self.name, self.load)
        return self.model


def _load(name: str, load: Callable[[], DiffusionModel]) -> DiffusionModel:
    try:
        return load()
    except SpdinvError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever diffusers or torch raise, said in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SpdinvError(f"the model {name} could not be loaded: {reason}") from None


class DemoModels:
    """The picker's models by name, in the picker's order; `default` is the one the page opens on."""

    def __init__(self, loaders: dict[str, Callable[[], DiffusionModel]], default: str) -> None:
        if default not in loaders:
            raise SpdinvError(f"the default model {default!r} is not among the offered: {', '.join(loaders)}")
        self.offered = {name: OfferedModel(name, load) for name, load in loaders.items()}
        self.default = default

    @classmethod
    def of(cls, model: DiffusionModel) -> DemoModels:
        """One model, already loaded, offered under its folder's name."""
        name = short_name(model)
        models = cls({name: lambda: model}, name)
        models.offered[name].model = model
        return models

    @property
    def names(self) -> list[str]:
        return list(self.offered)

    def entry(self, name: str | None) -> OfferedModel:
        """The offered model of that name (None: the default); any other name is refused in one line."""
        name = self.default if name is None or name == "" else name
        if name not in self.offered:
            raise SpdinvError(f"unknown model {name!r}; the demo offers: {', '.join(self.offered)}")
        return self.offered[name]

    def get(self, name: str | None) -> DiffusionModel:
        return self.entry(name).loaded()


def short_name(model: DiffusionModel) -> str:
    """The model's folder or hub name without its path: what the page shows."""
    return model.name.rstrip("/").split("/")[-1]


__all__ = ["DemoModels", "OfferedModel", "short_name"]

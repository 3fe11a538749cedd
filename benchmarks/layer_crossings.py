"""How often the command line's `args`, and the option values built from it, go down a layer and
come back up before an edit's computation starts (issue 23's measure; the target is at most 8).

Runs `spdinv edit` in-process on the embedded model under `sys.setprofile` and follows `args`:
a value is tracked when it is the argparse Namespace or was returned by a call that received a
tracked value (and the dicts, lists, tuples and option dataclasses inside it; not the model,
tensors or images, which are what the options are used on). A crossing is a call from
a spdinv module to a spdinv function of a lower layer (tests/test_architecture.py's LAYERS) that
receives a tracked value (by identity, or for a dict rebuilt by `**options`, by its pairs): its
return comes back up. Counting stops where the work starts: when the iterator `editing.edits`
returns starts (`_edit_groups`), or, in code without it, when the first inversion is asked for
(`editing._invert`). Plain ints and strings are not tracked (their ids are shared).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/layer_crossings.py [--list]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_architecture import layer_of  # noqa: E402


def _module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    if name != "spdinv" and not name.startswith("spdinv."):
        return None
    return name.removeprefix("spdinv").lstrip(".")


def _parts(value, depth: int = 0):
    """The value and the option containers inside it: dicts, lists, tuples, dataclasses (not plain
    ints or strings, whose ids are shared, and not the model, tensors or images it was used with)."""
    if depth > 3 or not isinstance(value, (argparse.Namespace, dict, list, tuple)) and not (
            dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value).__name__ != "DiffusionModel"):
        return
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _parts(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _parts(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _parts(getattr(value, field.name, None), depth + 1)


def _items(value) -> frozenset | None:
    """A non-empty dict's (key, value) pairs, when they are hashable."""
    if not isinstance(value, dict) or not value:
        return None
    try:
        return frozenset(value.items())
    except Exception:  # noqa: BLE001 - unhashable values, or an object half built
        return None


class Tracer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.tracked = {id(args)}
        self.keep = [args]  # tracked objects stay alive, so their ids are not reused
        self.items: list[frozenset] = []  # tracked dicts' pairs: `**options` rebuilds a dict, with the same pairs
        self.crossings: Counter[str] = Counter()
        self.carrying: set = set()  # frames that received a tracked value
        self.done = False

    def track(self, value) -> None:
        for part in _parts(value):
            self.tracked.add(id(part))
            self.keep.append(part)
            pairs = _items(part)
            if pairs is not None:
                self.items.append(pairs)

    def is_tracked(self, value) -> bool:
        for part in _parts(value):
            if id(part) in self.tracked:
                return True
            pairs = _items(part)
            if pairs is not None and any(pairs <= seen or seen <= pairs for seen in self.items):
                return True
        return False

    def __call__(self, frame, event, arg) -> None:
        if self.done or event not in ("call", "return"):
            return
        callee = _module(frame)
        if callee is None:
            return
        code = frame.f_code
        if event == "call":
            if callee == "editing" and code.co_name in ("_invert", "_edit_groups"):
                self.done = True  # the work starts: edits()' iterator runs, or the first inversion is asked for
                return
            count = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
            named = {n: frame.f_locals[n] for n in code.co_varnames[:count] if n in frame.f_locals and n != "self"}
            if not any(self.is_tracked(value) for value in [*named.values(), named]):  # `named`: options spread
                return
            self.carrying.add(frame)
            if code.co_name == "__init__" and "self" in frame.f_locals:  # an options dataclass built from them
                self.track(frame.f_locals["self"])
            caller = _module(frame.f_back) if frame.f_back is not None else None
            if caller is not None and layer_of(caller) > layer_of(callee):
                self.crossings[f"{caller} -> {callee}.{code.co_qualname}"] += 1
        elif frame in self.carrying:
            self.carrying.discard(frame)
            self.track(arg)


def main() -> None:
    import torch

    from spdinv.cli import parse

    torch.set_num_threads(1)
    listing = "--list" in sys.argv
    with tempfile.TemporaryDirectory() as folder:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (64, 64), (120, 72, 40))
        ImageDraw.Draw(image).rectangle((17, 15, 47, 45), fill=(140, 50, 170))
        image.save(Path(folder) / "square.png")
        args = parse(["edit", str(Path(folder) / "square.png"), "--source",
                      "a large purple square in the centre on a brown background", "--target",
                      "a large purple circle in the centre on a brown background", "--steps", "2", "--quiet",
                      "--cache", str(Path(folder) / "cache"), "--blend", "square circle", "--K", "3", "--out", str(Path(folder) / "out")])
        tracer = Tracer(args)
        sys.setprofile(tracer)
        try:
            args.run(args)
        finally:
            sys.setprofile(None)
    total = sum(tracer.crossings.values())
    if listing:
        for where, count in sorted(tracer.crossings.items()):
            print(f"{count:3d}  {where}")
    print(f"args and its options go down a layer and back up {total} times before the inversion starts "
          f"({len(tracer.crossings)} distinct calls)")


if __name__ == "__main__":
    main()

"""Writing results all-or-nothing: files are staged in a temporary folder beside the output
folder and moved in only when everything succeeded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import SpdinvError


def check_output_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpdinvError(f"output path is a file, not a folder: {out}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpdinvError(f"output path is inside a file: {parent}")
            break
    return out


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success its files replace those of the same name in `out`."""
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for item in sorted(stage.rglob("*")):
            target = out / item.relative_to(stage)
            if item.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float):
        return value
    return str(value)

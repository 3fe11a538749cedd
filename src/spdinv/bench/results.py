"""The results CSV: durable appends, torn-line repair, and the deterministic merge.

One row per (id, inversion, engine). Each process appends to its own part file, one whole line per
write, flushed and fsynced, so a SIGKILL loses at most the row being computed; a line without its
newline can only be the torn tail of an interrupted write, and is cut off when the file is opened
again. `merge` writes results.csv atomically in the canonical order (dataset order of the ids,
then the order of --inversion, then of --engine); rows of earlier runs outside the current job
list follow in the order they were found. No key ever appears twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import SpdinvError, first_line
from ..outputs import write_atomically

KEY_COLUMNS = ("id", "category", "inversion", "engine")
ERROR_COLUMN = "error"
RESULTS_FILE = "results.csv"
SETTINGS_FILE = "run.json"
PARTS_FOLDER = "parts"

Key = tuple[str, str, str]  # (id, inversion, engine)


def recorded_settings(out: Path, settings: dict, keys: Iterable[str]) -> dict | None:
    """The settings a resumed run recorded in OUT/run.json (None for a new run), refused in one line
    when one of `keys` differs from `settings`: the rows kept must have been made the same way."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    differing = [k for k in keys if json.dumps(recorded.get(k)) != json.dumps(settings[k])]
    if differing:
        first = differing[0]
        raise SpdinvError(f"{out} holds a run with other settings ({first}: {recorded.get(first)!r} "
                          f"vs {settings[first]!r}); use another --out")
    return recorded


def columns(metrics: list[str]) -> list[str]:
    return [*KEY_COLUMNS, *metrics, ERROR_COLUMN]


def row_key(row: dict[str, str]) -> Key:
    return row["id"], row["inversion"], row["engine"]


def format_value(value: float) -> str:
    """Six significant digits: enough for every table, and robust to last-bit differences."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def encode_row(header: list[str], row: dict) -> str:
    """One CSV line (newline-terminated); newlines inside values are flattened to spaces."""
    buffer = io.StringIO()
    values = [str(row.get(name, "")).replace("\r", " ").replace("\n", " ") for name in header]
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def part_path(out: Path, rank: int) -> Path:
    return out / PARTS_FOLDER / f"rank-{rank}.csv"


def part_paths(out: Path) -> list[Path]:
    """Every part file, in rank order."""
    folder = out / PARTS_FOLDER
    if not folder.is_dir():
        return []
    return sorted(folder.glob("rank-*.csv"), key=lambda p: int(p.stem.split("-")[1]))


def cut_torn_tail(path: Path) -> int:
    """Truncate a file after its last newline; returns the number of bytes cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        chunk = 1 << 16
        end = size
        while end > 0:  # scan back for the last newline
            start = max(0, end - chunk)
            handle.seek(start)
            block = handle.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return size - keep


def read_rows(path: Path, header: list[str] | None = None) -> list[dict[str, str]]:
    """The complete rows of a results file (a torn last line is ignored); with `header`, a file
    written with other columns is an error."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        lines = list(csv.reader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as error:
        raise SpdinvError(f"{path} is not a results file spdinv wrote (not CSV text: {first_line(error)[:80]}); "
                          "move it or use another --out") from None
    if not lines:
        return []
    found = lines[0]
    if header is not None and found != header:
        raise SpdinvError(f"{path} holds results with other columns ({', '.join(found[len(KEY_COLUMNS):-1])}); "
                          "rerun with the same --metrics or another --out")
    return [dict(zip(found, values)) for values in lines[1:] if len(values) == len(found)]


@dataclass
class PartWriter:
    """Appends rows to one process's part file, durably, one whole line per write."""

    path: Path
    header: list[str]

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            cut_torn_tail(self.path)
            read_rows(self.path, self.header)  # same columns?
        self._handle = self.path.open("a", encoding="utf-8", newline="")
        if self._handle.tell() == 0:
            self._write(encode_row(self.header, dict(zip(self.header, self.header))))

    def append(self, row: dict) -> None:
        self._write(encode_row(self.header, row))

    def _write(self, line: str) -> None:
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def finished_keys(out: Path, header: list[str]) -> set[Key]:
    """Keys of every complete row in results.csv and in all part files."""
    keys: set[Key] = set()
    for path in [out / RESULTS_FILE, *part_paths(out)]:
        keys.update(row_key(r) for r in read_rows(path, header))
    return keys


def merge(out: Path, header: list[str], order: list[Key], extra_rows: Iterable[dict] = ()) -> Path:
    """Write results.csv from results.csv, the part files and `extra_rows` (rows gathered from
    other nodes), atomically: rows of other runs into the same folder first, as they were, then this
    run's in canonical `order`; the part files are left for the caller."""
    found: dict[Key, dict] = {}
    sources = [read_rows(out / RESULTS_FILE, header), *(read_rows(p, header) for p in part_paths(out)), extra_rows]
    for rows in sources:
        for row in rows:
            found.setdefault(row_key(row), row)
    position = {key: i for i, key in enumerate(order)}
    ranked = sorted((k for k in found if k in position), key=position.__getitem__)
    others = [k for k in found if k not in position]
    lines = [encode_row(header, dict(zip(header, header)))]
    lines += [encode_row(header, found[k]) for k in others + ranked]
    return write_atomically(out / RESULTS_FILE, "".join(lines))


"""Writing results all-or-nothing.

A command writes its files into a staging folder on the output folder's own file system, then
commits them in one step:

- swap: when `out` is absent, empty, or holds only a previous spdinv output (its manifest lists
  every file there), the staging folder is a hidden sibling of `out` and the commit is a rename of
  that folder onto `out` (an old `out` is renamed aside just before and removed just after).
- merge: otherwise (`out` is a mount point or on another device than its parent, a symbolic link,
  in a read-only parent, or holds other files, e.g. `--out .`), the staging folder is inside `out`;
  the commit moves the files in, keeping every file it replaces or removes in the staging folder
  until all are in (a failure puts them back), and writes the manifest last.

Either way nothing crosses a file system (no EXDEV), the old output stays whole until the new one
is complete, and `out` ends up holding exactly the new output (files of the previous output that
the new one lacks are removed; other files are left alone). A file spdinv did not write is never
replaced nor removed: spdinv's own are those its manifest lists with their size and checksum (a
file the user changed since is theirs); a commit that would replace another is refused in one line
(`foreign_files` lets a command refuse before any compute). Every output folder gets
`.spdinv-manifest.json` (each file's size and SHA-256), written last. Staging folders of runs
that were killed (their process is gone) are cleaned by the next run writing to the same `out`:
a commit that had begun is finished, anything else removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from .errors import SpdinvError

MANIFEST = ".spdinv-manifest.json"
_RETRIES = 5
_SCRATCH = ".spdinv-"  # staging / set-aside folder names: .spdinv-TAG.KIND.PID.HOST.TOKEN
_INSIDE = "in"  # the tag of a staging folder inside `out`
_REPLACED = ".spdinv-replaced"  # inside a merge's staging folder: what the commit replaced or removed


# ---------------------------------------------------------------- checks before any compute


def check_output_dir(out: str | Path, what: str = "output") -> Path:
    """`out` as a Path, once it is known that it can be written: not a file nor inside one, names
    within the file system's limit, and a folder can be created where it goes (tried, then removed)."""
    out = Path(out)
    with _commit_lock(out):  # not while another writer swaps `out` (it is absent for a moment)
        return _check_writable(out, what)


def _check_writable(out: Path, what: str) -> Path:
    for _ in range(_RETRIES):  # a folder that vanishes while checked is being replaced by a writer we cannot lock out
        existing = _nearest_existing(out)
        _check_name_lengths(out, existing, what)
        if existing == out and out.is_file():
            raise SpdinvError(f"{what} path is a file, not a folder: {out}")
        if existing != out and existing.is_file():
            raise SpdinvError(f"{what} path is inside a file: {existing}")
        try:
            os.rmdir(_scratch_folder(existing, "probe"))
        except FileNotFoundError as error:
            if not _exists(existing):
                continue  # it vanished while checked
            where = out if existing == out else existing
            raise SpdinvError(f"cannot write to {out}: {where} is not writable ({error.strerror})") from None
        except OSError as error:
            where = out if existing == out else existing
            raise SpdinvError(f"cannot write to {out}: {where} is not writable ({error.strerror})") from None
        return out
    raise SpdinvError(f"cannot write to {out}: it keeps vanishing (another process replacing it?)")


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if _exists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _check_name_lengths(out: Path, existing: Path, what: str) -> None:
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in out.parts:
        if len(os.fsencode(part)) > limit:
            raise SpdinvError(f"{what} name too long ({len(os.fsencode(part))} bytes; the file system allows "
                              f"{limit}): {part[:40]}...")


# ---------------------------------------------------------------- staging and committing


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success its files become the content of `out` (see the module
    docstring); on any failure `out` is as it was and the staging folder is gone (an OSError, such
    as a full disk, becomes a one-line SpdinvError)."""
    out = check_output_dir(out)
    try:
        created = _make_parents(out)
        with _commit_lock(out):  # not while another writer swaps `out` (absent for a moment, or half read)
            try:
                clean_abandoned(out)
            except OSError:  # what a killed run left is in the way of nothing: this run's commit replaces it
                pass
            stage, swap = _new_stage(out)
    except OSError as error:  # a full disk before anything was written
        raise SpdinvError(f"could not write {out} ({error.strerror or error}); it is unchanged") from None
    try:
        yield stage
        write_manifest(stage)
        with _commit_lock(out):  # concurrent writers commit one after the other: the last one's output stays whole
            if swap and _swappable(out):
                _swap(stage, out)
            else:
                _merge(stage, out)
    except BaseException as error:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # deepest first; only the ones this call made, and only when empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(error, OSError):  # disk full, a folder where a file goes, ...
            where = f": {error.filename}" if error.filename else ""
            raise SpdinvError(f"could not write {out} ({error.strerror or error}{where}); it is unchanged") from None
        raise


@contextmanager
def _commit_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on the parent folder of `out` while inside (none where the parent cannot
    be opened or locked: then commits are not serialised, as before)."""
    try:
        handle = os.open(out.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(handle)  # closing releases the lock


def _make_parents(out: Path) -> list[Path]:
    missing = [p for p in out.parents if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _new_stage(out: Path) -> tuple[Path, bool]:
    """(staging folder, whether the commit is a swap)."""
    if _swappable(out):
        try:
            return _scratch_folder(out.parent, "stage", _tag(out)), True
        except OSError:  # the parent is not writable (only `out` is): merge
            pass
    if not out.exists():
        raise SpdinvError(f"cannot write to {out}: {out.parent} is not writable")
    return _scratch_folder(out, "stage", _INSIDE), False


def _swappable(out: Path) -> bool:
    if not out.exists():
        return True
    if out.is_symlink() or os.path.ismount(out) or out.stat().st_dev != out.parent.stat().st_dev:
        return False
    owned = set(owned_files(out)) | {MANIFEST}  # a listed file the user changed since is theirs
    return all(p.is_dir() and not p.is_symlink() or str(p.relative_to(out)) in owned for p in out.rglob("*"))


def _swap(stage: Path, out: Path) -> None:
    aside = None
    if out.exists():
        os.chmod(stage, stat.S_IMODE(out.stat().st_mode))  # the folder keeps its permissions
        aside = stage.with_name(stage.name.replace(".stage.", ".old.", 1))
        os.rename(out, aside)
    try:
        os.rename(stage, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _merge(stage: Path, out: Path) -> None:
    """Move the staged files into `out`, manifest last; undone on failure. Safe to call again on a
    staging folder whose merge was interrupted (it continues where it stopped). Refused (nothing
    moved) when a staged file would replace a file spdinv did not write."""
    replaced = stage / _REPLACED
    new = [f for f in manifest_files(stage) if f != MANIFEST]
    manifest_home = out if (out / MANIFEST).is_file() else replaced
    owned = set(owned_files(out, manifest_home))
    refuse_foreign(out, [f for f in new if (stage / f).exists() and f not in owned])
    stale = [f for f in owned if f not in new]
    done: list[tuple[str, str]] = []  # (what, relative path), to undo in reverse
    try:
        for relative in [MANIFEST, *stale]:
            if _move(out / relative, replaced / relative):
                done.append(("aside", relative))
        for relative in new:
            if not (stage / relative).exists():
                continue  # moved in by the interrupted run this call finishes
            if _move(out / relative, replaced / relative):
                done.append(("aside", relative))
            _move(stage / relative, out / relative)
            done.append(("in", relative))
        _move(stage / MANIFEST, out / MANIFEST)
    except BaseException:
        for what, relative in reversed(done):
            if what == "in":
                _move(out / relative, stage / relative)
            else:
                _move(replaced / relative, out / relative)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    for relative in stale:  # folders only the previous output used
        for folder in (out / relative).parents:
            if folder == out or (folder.is_dir() and any(folder.iterdir())):
                break
            if folder.is_dir():
                folder.rmdir()


def _move(source: Path, target: Path) -> bool:
    """os.replace within one file system, making the target's folder; False when there is no source."""
    if not source.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    return True


# ---------------------------------------------------------------- the manifest


def owned_files(out: Path, manifest_home: Path | None = None) -> list[str]:
    """The files under `out` that spdinv wrote: listed in the manifest (in `manifest_home`,
    default `out`) with the size and checksum they still have."""
    try:
        files = json.loads(((manifest_home or out) / MANIFEST).read_text())["files"]
        records = {str(name): (int(r["bytes"]), str(r["sha256"])) for name, r in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    owned = []
    for relative, (size, digest) in records.items():
        path = out / relative
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size == size and _sha256(path) == digest:
                owned.append(relative)
        except OSError:
            continue
    return owned


def foreign_files(out: str | Path, names: list[str]) -> list[str]:
    """Which of `names` (paths relative to `out`) exist in `out` without being spdinv's own."""
    out = Path(out)
    present = [name for name in names if _exists(out / name)]
    if not present:
        return []
    owned = set(owned_files(out))
    return [name for name in present if name not in owned]


def refuse_foreign(out: Path, names: list[str]) -> None:
    """A one-line SpdinvError naming what in `out` spdinv would replace but did not write."""
    foreign = [name for name in names if _exists(out / name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise SpdinvError(f"{out} holds {shown}, not written by spdinv; not replacing it: choose another output "
                          "folder or move the file(s)")


def check_no_foreign(out: str | Path, names: list[str]) -> None:
    """Refuse, before any compute, an output folder where these files exist and are not spdinv's."""
    refuse_foreign(Path(out), foreign_files(out, names))


def write_manifest(folder: Path) -> None:
    """List every file under `folder` with its size and SHA-256 (written last: its presence marks a
    complete output)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = str(path.relative_to(folder))
        files[relative] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def manifest_files(folder: Path) -> list[str]:
    """The files a folder's manifest lists ([] without a readable manifest)."""
    try:
        return list(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def check_manifest(folder: Path) -> list[str]:
    """What does not match the folder's manifest (missing, resized or changed files); [] when whole."""
    try:
        files = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"no readable {MANIFEST}"]
    problems = []
    for relative, record in files.items():
        path = Path(folder) / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
            problems.append(f"{relative} differs from the manifest")
    return problems


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------- scratch folders and clean-up


@dataclass(frozen=True)
class _Scratch:
    path: Path
    tag: str
    kind: str
    pid: int
    host: str
    token: str

    @property
    def abandoned(self) -> bool:
        """Its process (on this machine) is gone."""
        if self.host != _host():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _tag(out: Path) -> str:
    return hashlib.sha1(os.fsencode(out.name)).hexdigest()[:10]


def _scratch_folder(home: Path, kind: str, tag: str = _INSIDE) -> Path:
    """Create and return home/.spdinv-TAG.KIND.PID.HOST.TOKEN (a fixed-length name: any `out`
    whose own name fits the file system can have one beside it)."""
    path = home / f"{_SCRATCH}{tag}.{kind}.{os.getpid()}.{_host()}.{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _scratches(home: Path, tag: str) -> list[_Scratch]:
    found = []
    try:
        entries = list(home.iterdir())
    except OSError:
        return []
    for path in entries:
        if not path.name.startswith(_SCRATCH + tag + ".") or not path.is_dir() or path.is_symlink():
            continue
        parts = path.name[len(_SCRATCH):].split(".")
        if len(parts) == 5 and parts[2].isdigit():
            found.append(_Scratch(path, parts[0], parts[1], int(parts[2]), parts[3], parts[4]))
    return [s for s in found if s.abandoned]


def clean_abandoned(out: str | Path) -> None:
    """Finish or remove what killed runs left beside and inside `out`: a swap stopped between its
    two renames is completed; a merge that had begun is finished; other staging folders go."""
    out = Path(out)
    beside = _scratches(out.parent, _tag(out))
    stages = {s.token: s for s in beside if s.kind == "stage"}
    for aside in (s for s in beside if s.kind == "old"):
        stage = stages.pop(aside.token, None)
        if not out.exists():
            complete = stage is not None and (stage.path / MANIFEST).is_file()
            os.rename(stage.path if complete else aside.path, out)
        shutil.rmtree(aside.path, ignore_errors=True)
        if stage is not None:
            shutil.rmtree(stage.path, ignore_errors=True)
    for stage in stages.values():
        shutil.rmtree(stage.path, ignore_errors=True)
    if out.is_dir():
        for stage in _scratches(out, _INSIDE):
            if (stage.path / MANIFEST).is_file():
                _merge(stage.path, out)
            shutil.rmtree(stage.path, ignore_errors=True)


# ---------------------------------------------------------------- JSON


def to_json(data, indent: int | None = 2) -> str:
    """Strict JSON text (newline-terminated) of `data`: tensors and numpy scalars as numbers, NaN
    and infinities as null (JSON has no such numbers; strict parsers reject Python's `NaN`), paths
    and anything else unknown as strings."""
    return json.dumps(_finite(data), indent=indent, default=_jsonable, allow_nan=False) + "\n"


def _finite(value):
    """`value` with every non-finite float (also inside tensors' and numpy's scalars) as None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a tensor's or numpy's scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data, indent: int | None = 2) -> Path:
    return write_atomically(path, to_json(data, indent))


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---------------------------------------------------------------- one file, atomically


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A temporary file next to `path`, opened in `mode` ("w" text, "wb" bytes); once the body
    returns it is flushed, fsynced and renamed over `path`, so a reader sees the old file or the
    whole new one. On an error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
    try:
        with temporary.open(mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # say which file (fsync's error names none)
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` all-or-nothing (`atomic_file`)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return Path(path)


__all__ = ["MANIFEST", "atomic_file", "check_manifest", "check_no_foreign", "check_output_dir", "clean_abandoned",
           "foreign_files", "manifest_files", "owned_files",
           "staged_output", "to_json", "write_atomically", "write_json", "write_manifest"]

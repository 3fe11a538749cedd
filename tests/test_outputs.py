"""All-or-nothing outputs (spdinv.outputs): swaps, merges into mount points, failures midway,
runs killed while committing, and outputs that cannot be written."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

import spdinv.outputs as outputs
from spdinv.cli import main
from spdinv.errors import SpdinvError
from spdinv.outputs import MANIFEST, check_manifest, check_output_dir, clean_abandoned, staged_output


def write(out: Path, files: dict[str, str]) -> None:
    with staged_output(out) as stage:
        for name, text in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_text(text)


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def scratch_left(*folders: Path) -> list[str]:
    return [p.name for folder in folders if folder.is_dir() for p in folder.iterdir()
            if p.name.startswith(".spdinv-") and p.name != MANIFEST]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_rerun_replaces_the_previous_output_whole(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.png": "old a", "sub/b.png": "old b"})
    assert check_manifest(out) == []
    write(out, {"a.png": "new a"})
    assert contents(out) == {"a.png": "new a", MANIFEST: (out / MANIFEST).read_text()}  # no stale sub/b.png
    assert check_manifest(out) == [] and not scratch_left(tmp_path, out)


def test_a_failure_while_staging_leaves_the_old_output_and_no_folders(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.png": "old"})
    before = contents(out)
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "a.png").write_text("new")
            raise RuntimeError("disk full")
    assert contents(out) == before and not scratch_left(tmp_path, out)
    deep = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with staged_output(deep):
            raise RuntimeError("boom")
    assert not (tmp_path / "x").exists()  # the parents this call made are gone again


def test_foreign_files_are_kept_and_the_previous_outputs_stale_files_removed(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.png": "old a", "sub/b.png": "old b"})
    (out / "notes.txt").write_text("mine")  # not spdinv's: the next commit merges instead of swapping
    write(out, {"a.png": "new a"})
    assert contents(out) == {"a.png": "new a", "notes.txt": "mine", MANIFEST: (out / MANIFEST).read_text()}
    assert not (out / "sub").exists() and not scratch_left(tmp_path, out)


def crossing_device(out: Path, real):
    """os.rename/os.replace as on a mount point `out`: anything across its boundary is EXDEV."""
    def move(source, target, *args, **kwargs):
        inside = [Path(p).resolve().is_relative_to(out.resolve()) for p in (source, target)]
        if inside[0] != inside[1]:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(source, target, *args, **kwargs)
    return move


def test_out_on_another_file_system_is_written_in_place(tmp_path, tiny_dir, red_circle, monkeypatch, capsys):
    """A mount point (a Docker volume): nothing may be renamed across it, nor `out` itself."""
    out = tmp_path / "volume"
    out.mkdir()
    (out / "keep.txt").write_text("the volume's own file")
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    monkeypatch.setattr(os, "rename", crossing_device(out, os.rename))
    monkeypatch.setattr(os, "replace", crossing_device(out, os.replace))
    args = ["invert", red_circle, "--prompt", "a large red circle", "--model", tiny_dir, "--out", out,
            "--steps", "2", "--method", "ddim", "--quiet"]
    assert main([str(a) for a in args]) == 0
    assert {"z_T.safetensors", "config.json", "keep.txt", MANIFEST} <= {p.name for p in out.iterdir()}
    assert check_manifest(out) == [] and not scratch_left(tmp_path, out)
    capsys.readouterr()


def test_world_export_onto_a_mount_point_leaves_no_stale_images_nor_empty_folders(tmp_path, monkeypatch, capsys):
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out)
    monkeypatch.setattr(os, "replace", crossing_device(out, os.replace))
    assert main(["world", "export", str(out), "--n", "12"]) == 0
    assert main(["world", "export", str(out), "--n", "3"]) == 0
    images = [p for p in (out / "annotation_images").rglob("*.png")]
    assert len(images) == 3 and all(any(d.iterdir()) for d in out.rglob("*") if d.is_dir())
    assert check_manifest(out) == [] and not scratch_left(tmp_path, out)
    capsys.readouterr()


def test_a_merge_failing_midway_is_undone(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    write(out, {"a.png": "old a", "b.png": "old b", "c.png": "old c"})
    before = contents(out)
    real, moves = os.replace, []

    def failing(source, target):
        moves.append(target)
        if len(moves) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(SpdinvError, match=r"could not write .*out \(No space left on device\); it is unchanged"):
        write(out, {"a.png": "new a", "b.png": "new b", "d.png": "new d"})
    monkeypatch.setattr(os, "replace", real)
    assert contents(out) == before and not scratch_left(tmp_path, out)


def test_a_swap_killed_between_its_renames_is_completed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.png": "old"})
    pid, host, token = dead_pid(), outputs._host(), "0badf00d"
    name = f".spdinv-{outputs._tag(out)}.%s.{pid}.{host}.{token}"
    aside, stage = tmp_path / (name % "old"), tmp_path / (name % "stage")
    os.rename(out, aside)
    stage.mkdir()
    (stage / "a.png").write_text("new")
    outputs.write_manifest(stage)
    clean_abandoned(out)
    assert contents(out)["a.png"] == "new" and not scratch_left(tmp_path)


def test_abandoned_staging_folders_are_removed_and_a_begun_merge_finished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    write(out, {"a.png": "old a", "b.png": "old b"})
    pid, host = dead_pid(), outputs._host()
    beside = tmp_path / f".spdinv-{outputs._tag(out)}.stage.{pid}.{host}.00000001"
    beside.mkdir()
    (beside / "half.png").write_text("half written")
    merging = out / f".spdinv-in.stage.{pid}.{host}.00000002"
    merging.mkdir()
    for name in ("a.png", "b.png"):
        (merging / name).write_text(f"new {name[0]}")
    outputs.write_manifest(merging)
    os.replace(merging / "a.png", out / "a.png")  # the kill came after the first move
    live = tmp_path / f".spdinv-{outputs._tag(out)}.stage.{os.getpid()}.{host}.00000003"
    live.mkdir()  # a running process's: left alone
    clean_abandoned(out)
    assert contents(out) == {"a.png": "new a", "b.png": "new b", "keep.txt": "mine",
                             MANIFEST: (out / MANIFEST).read_text()}
    assert scratch_left(tmp_path, out) == [live.name]


@pytest.mark.parametrize("out, message", [
    ("/proc/spdinv-out", "cannot write to /proc/spdinv-out: /proc is not writable"),
    ("a" * 300, "output name too long (300 bytes"),
])
def test_unwritable_outputs_are_refused_before_any_compute(tmp_path, out, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpdinvError) as error:
        check_output_dir(out)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_read_only_file_system_is_refused_in_one_line(tmp_path, monkeypatch, red_circle, capsys):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = main(["invert", str(red_circle), "--prompt", "a red circle", "--out", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and "Read-only file system" in err and len(err.strip().splitlines()) == 1


KILLER = """
import os, signal, sys
from pathlib import Path
from spdinv.outputs import staged_output

out, call, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real, count = getattr(os, call), [0]

def killed(*args, **kwargs):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(os, call, killed)
with staged_output(out) as stage:
    for name in ("a.png", "b.png", "c.png"):
        (stage / name).write_text("new " + name)
"""


@pytest.mark.parametrize("foreign, call, kill_at, result", [
    (False, "rename", 1, "old"),  # a swap killed before moving the old folder aside: not committed
    (False, "rename", 2, "new"),  # between its two renames: the complete staging folder is put in place
    (True, "replace", 1, "new"), (True, "replace", 3, "new"), (True, "replace", 6, "new"),  # a begun merge
])
def test_sigkill_while_committing_loses_nothing_and_the_next_run_finishes(tmp_path, foreign, call, kill_at, result):
    out = tmp_path / "out"
    write(out, {"a.png": "old a", "old.png": "old only"})
    if foreign:
        (out / "keep.txt").write_text("mine")  # makes the commit a merge
    killer = subprocess.run([sys.executable, "-c", KILLER, str(out), call, str(kill_at)],
                            env={**os.environ, "PYTHONPATH": str(Path(outputs.__file__).parents[1])})
    assert killer.returncode == -9
    clean_abandoned(out)
    files = contents(out)
    files.pop(MANIFEST)
    expected = {"old": {"a.png": "old a", "old.png": "old only"},
                "new": {"a.png": "new a.png", "b.png": "new b.png", "c.png": "new c.png"}}[result]
    assert files == ({**expected, "keep.txt": "mine"} if foreign else expected)
    assert check_manifest(out) == [] and not scratch_left(tmp_path, out)

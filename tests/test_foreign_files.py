"""`--out` never replaces nor removes a file spdinv did not write (README, docs/bad-input.md):
spdinv's own files are those its manifest lists with their size and checksum."""

import pytest
from PIL import Image

from spdinv.cli import main
from spdinv.errors import SpdinvError
from spdinv.outputs import MANIFEST, staged_output

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def write(out, files):
    with staged_output(out) as stage:
        for name, text in files.items():
            (stage / name).write_text(text)


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_a_commit_never_replaces_a_file_spdinv_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_text("the user's")
    with pytest.raises(SpdinvError, match=r"holds a.png, not written by spdinv"):
        write(out, {"a.png": "spdinv's", "b.png": "spdinv's"})
    assert sorted(p.name for p in out.iterdir()) == ["a.png"] and (out / "a.png").read_text() == "the user's"


def test_a_file_of_spdinvs_the_user_changed_is_theirs(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.png": "first", "b.png": "first"})
    (out / "b.png").write_text("edited by hand")  # listed in the manifest, but no longer what spdinv wrote
    write(out, {"a.png": "second"})  # b.png is stale for this output, but not spdinv's any more: kept
    assert (out / "a.png").read_text() == "second" and (out / "b.png").read_text() == "edited by hand"
    with pytest.raises(SpdinvError, match="b.png"):
        write(out, {"b.png": "third"})
    assert (out / "b.png").read_text() == "edited by hand"
    write(out, {"a.png": "fourth"})  # spdinv's own file is replaced as before
    assert (out / "a.png").read_text() == "fourth" and (out / MANIFEST).is_file()


def test_edit_into_the_images_own_folder_keeps_the_original(tmp_path, tiny_dir, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (120, 90), (200, 40, 40)).save(photos / "source.png")
    before = (photos / "source.png").read_bytes()
    code, captured = run(["edit", photos / "source.png", "--source", SOURCE, "--target", TARGET, "--model", tiny_dir,
                          "--steps", "2", "--inversion", "ddim", "--out", photos, "--no-cache", "--quiet"], capsys)
    assert code == 2 and captured.err.count("\n") == 1 and "source.png, not written by spdinv" in captured.err
    assert (photos / "source.png").read_bytes() == before and [p.name for p in photos.iterdir()] == ["source.png"]


def test_a_users_own_edit_png_in_out_is_kept(tmp_path, tiny_dir, red_circle, capsys):
    out = tmp_path / "out"
    args = ["edit", red_circle, "--source", SOURCE, "--target", TARGET, "--model", tiny_dir, "--steps", "2",
            "--inversion", "ddim", "--out", out, "--no-cache", "--quiet"]
    assert run(args, capsys)[0] == 0
    assert run(args, capsys)[0] == 0  # a rerun replaces spdinv's own output
    (out / "edit.png").write_bytes(b"my own edit")
    code, captured = run(args, capsys)
    assert code == 2 and captured.err.count("\n") == 1 and "edit.png" in captured.err
    assert (out / "edit.png").read_bytes() == b"my own edit"


def test_invert_refuses_an_out_holding_a_users_config_json(tmp_path, tiny_dir, red_circle, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, captured = run(["invert", red_circle, "--prompt", SOURCE, "--model", tiny_dir, "--steps", "2", "--out", out,
                          "--quiet"], capsys)
    assert code == 2 and captured.err.count("\n") == 1 and "config.json" in captured.err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"

"""Faults of the machine and odd files: a full disk (fault injection: os / safetensors raise
ENOSPC), FIFOs given as images, concurrent writers, damaged files where spdinv expects its own.
Each is one line (exit 2) or, for the optional inversion cache, a warning and the result kept."""

import errno
import json
import os
import threading

import pytest
from PIL import Image

import spdinv.export
import spdinv.outputs as outputs
from spdinv.cli import main
from spdinv.editing import edit
from spdinv.editing.cache import InversionCache
from spdinv.errors import SpdinvError

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> bool:
    """Exactly one error line (notes and warnings may precede it) and no traceback."""
    return err.count("spdinv: error:") == 1 and "Traceback" not in err and err.endswith("\n")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def full_under(root, real):
    """`real` (os.mkdir, ...) that fails with ENOSPC for any path under `root`."""
    def call(path, *args, **kwargs):
        if str(os.fspath(path)).startswith(str(root)):
            no_space()
        return real(path, *args, **kwargs)
    return call


# ---------------------------------------------------------------- the optional inversion cache


@pytest.mark.parametrize("where", ["files", "folders"])
def test_a_full_disk_in_the_cache_never_costs_the_edit(tiny, red_circle, tmp_path, monkeypatch, where):
    cache = InversionCache(tmp_path / "cache")
    if where == "files":
        monkeypatch.setattr(spdinv.export, "save_file", no_space)
    else:
        monkeypatch.setattr(os, "mkdir", full_under(tmp_path / "cache", os.mkdir))
    result = edit(tiny, Image.open(red_circle), SOURCE, TARGET, "ddim", "p2p", num_steps=2, cache=cache)
    assert result.edited.shape[0] == 1 and "No space left" in cache.problem and "\n" not in cache.problem
    assert not any(p.name.startswith(".spdinv-") for p in (tmp_path / "cache").glob("*"))


def test_spdinv_edit_with_a_full_cache_disk_warns_and_writes_the_edit(tmp_path, tiny_dir, red_circle, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(spdinv.export, "save_file", no_space)
    out = tmp_path / "out"
    code, _, err = run(["edit", red_circle, "--source", SOURCE, "--target", TARGET, "--model", tiny_dir, "--steps", "2",
                        "--inversion", "ddim", "--out", out, "--cache", tmp_path / "cache", "--quiet"], capsys)
    assert code == 0 and "warning: inversions not cached" in err and (out / "edit.png").is_file()


# ---------------------------------------------------------------- a full disk under --out


def test_a_full_disk_under_invert_out_is_one_line_and_leaves_nothing(tmp_path, tiny_dir, red_circle, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(spdinv.export, "save_file", no_space)
    out = tmp_path / "out"
    code, _, err = run(["invert", red_circle, "--prompt", SOURCE, "--model", tiny_dir, "--steps", "2", "--out", out,
                        "--quiet"], capsys)
    assert code == 2 and one_error(err) and "No space left" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".spdinv-")]


def test_a_full_disk_under_concept_encode_out_is_one_line(tmp_path, red_circle, monkeypatch, capsys):
    monkeypatch.setattr(os, "fsync", no_space)  # where a delayed-allocation file system reports it
    code, _, err = run(["concept", "encode", red_circle, "--out", tmp_path / "c.safetensors"], capsys)
    assert code == 2 and one_error(err) and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_bench_out_is_one_line(tmp_path, tiny_dir, monkeypatch, capsys):
    from spdinv.world.dataset import export

    data = export(tmp_path / "world", 1, seed=0)
    monkeypatch.setattr(os, "mkdir", full_under(tmp_path / "bench", os.mkdir))
    code, _, err = run(["bench", data, "--out", tmp_path / "bench", "--model", tiny_dir, "--steps", "2",
                        "--inversion", "ddim", "--engine", "none", "--metrics", "psnr", "--quiet"], capsys)
    assert code == 2 and one_error(err) and "No space left" in err


# ---------------------------------------------------------------- concurrent writers


def test_concurrent_writers_to_one_folder_each_commit_whole(tmp_path):
    out, errors = tmp_path / "out", []

    def writer(n: int) -> None:
        try:
            for round_ in range(15):
                with outputs.staged_output(out) as stage:
                    for name in ("a.png", "b.png", "c.json"):
                        (stage / name).write_text(f"writer {n} round {round_}")
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(error))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    texts = {(out / name).read_text() for name in ("a.png", "b.png", "c.json")}
    assert len(texts) == 1 and outputs.check_manifest(out) == []  # one writer's whole output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".spdinv-")]


# ---------------------------------------------------------------- FIFOs


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_a_fifo_as_the_image_is_refused_at_once(tmp_path, tiny_dir, fifo, capsys):
    for args in (["invert", fifo, "--prompt", SOURCE], ["edit", fifo, "--source", SOURCE, "--target", TARGET]):
        code, _, err = run([*args, "--model", tiny_dir, "--out", tmp_path / "out", "--quiet"], capsys)
        assert code == 2 and "is a FIFO (named pipe), not a regular file" in err and one_error(err)


def test_a_fifo_in_a_bench_dataset_is_refused_at_once(tmp_path, tiny_dir, capsys):
    from spdinv.world.dataset import export

    data = export(tmp_path / "world", 2, seed=0)
    mapping = json.loads((data / "mapping_file.json").read_text())
    image = data / "annotation_images" / next(iter(mapping.values()))["image_path"]
    image.unlink()
    os.mkfifo(image)
    code, _, err = run(["bench", data, "--out", tmp_path / "bench", "--model", tiny_dir, "--steps", "2",
                        "--inversion", "ddim", "--engine", "none", "--metrics", "psnr", "--quiet"], capsys)
    assert code == 2 and "FIFO" in err and one_error(err)


# ---------------------------------------------------------------- files spdinv expects to be its own


def test_a_binary_results_csv_and_a_file_as_report_out_are_one_line(tmp_path, capsys):
    (tmp_path / "results.csv").write_bytes(bytes(range(256)) * 4)
    code, _, err = run(["report", tmp_path / "results.csv"], capsys)
    assert code == 2 and "not a spdinv bench results file" in err and one_error(err)
    from spdinv.bench.results import read_rows

    with pytest.raises(SpdinvError, match="not a results file spdinv wrote"):
        read_rows(tmp_path / "results.csv")
    good = tmp_path / "good.csv"
    good.write_text("id,category,inversion,engine,psnr,error\n1,0,ddim,none,20,\n")
    (tmp_path / "a-file").write_text("mine")
    code, _, err = run(["report", good, "--out", tmp_path / "a-file"], capsys)
    assert code == 2 and "is a file" in err and one_error(err) and (tmp_path / "a-file").read_text() == "mine"


# ---------------------------------------------------------------- the demo's address


def test_the_demo_names_a_busy_port_and_an_unresolvable_host_rightly(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["demo", "--port", port, "--no-cache"], capsys)
    assert code == 2 and one_error(err) and f"port {port} on 127.0.0.1 is in use" in err
    code, _, err = run(["demo", "--host", "no-such-host.invalid", "--no-cache"], capsys)
    assert code == 2 and one_error(err) and "cannot resolve the host 'no-such-host.invalid'" in err
    code, _, err = run(["demo", "--host", "192.0.2.1", "--no-cache"], capsys)  # TEST-NET-1: nobody's address
    assert code == 2 and one_error(err) and "not an address of this machine" in err


# ---------------------------------------------------------------- bench datasets


def _mapping_with(tmp_path, change):
    from spdinv.world.dataset import export

    data = export(tmp_path / "world", 2, seed=0)
    text = (data / "mapping_file.json").read_text()
    (data / "mapping_file.json").write_text(change(json.loads(text), text))
    return data


def _duplicate_first(mapping, text):
    first_id, first = next(iter(mapping.items()))
    return "{" + json.dumps(first_id) + ": " + json.dumps(first) + ", " + text.strip()[1:]


def _rename(new_ids):
    def change(mapping, text):
        return json.dumps(dict(zip(new_ids, mapping.values())))
    return change


def _category(value):
    def change(mapping, text):
        first = next(iter(mapping))
        mapping[first]["editing_type_id"] = value
        return json.dumps(mapping)
    return change


@pytest.mark.parametrize("change, message", [
    (_duplicate_first, "gives id"),
    (_rename(["a/b", "a:b"]), "give one file name (a_b)"),
    (_rename(["one\ntwo", "three"]), "holds a newline or control character"),
    (_rename(["", "three"]), "is empty"),
    (_category([1, 2]), "editing_type_id must be text or an integer"),
    (_category(None), "editing_type_id must be text or an integer"),
])
def test_bad_bench_ids_and_categories_are_one_line(tmp_path, change, message):
    from spdinv.bench.datasets import load_dataset

    data = _mapping_with(tmp_path, change)
    with pytest.raises(SpdinvError) as error:
        load_dataset(data)
    assert message in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- world train checkpoints


def test_world_train_refuses_a_damaged_checkpoint_and_other_settings(tmp_path):
    from spdinv.world.train import TrainConfig, Trainer

    tiny = dict(n_scenes=4, vae_steps=1, vae_batch=2, unet_steps=1, unet_batch=2, unet_warmup=1, threads=1)
    Trainer(tmp_path / "work", TrainConfig(**tiny)).save_checkpoint({})
    assert Trainer(tmp_path / "work", TrainConfig(**tiny, device="cpu", checkpoint_every=7)).load_checkpoint()
    assert Trainer(tmp_path / "work", TrainConfig(**{**tiny, "unet_steps": 9})).load_checkpoint()  # extends the run
    with pytest.raises(SpdinvError, match=r"started with other settings \(unet_lr: 0.0006 there, 0.001 now\)"):
        Trainer(tmp_path / "work", TrainConfig(**{**tiny, "unet_lr": 1e-3})).load_checkpoint()
    Trainer(tmp_path / "work", TrainConfig(**{**tiny, "unet_steps": 2})).save_checkpoint({})
    with pytest.raises(SpdinvError, match=r"\(unet_steps: 2 there, 1 now\)"):  # fewer steps do not extend it
        Trainer(tmp_path / "work", TrainConfig(**tiny)).load_checkpoint()
    checkpoint = tmp_path / "work" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # truncated
    with pytest.raises(SpdinvError, match="is damaged or not a world checkpoint"):
        Trainer(tmp_path / "work", TrainConfig(**tiny)).load_checkpoint()
    checkpoint.write_bytes(b"")
    with pytest.raises(SpdinvError, match="is damaged or not a world checkpoint"):
        Trainer(tmp_path / "work", TrainConfig(**tiny)).load_checkpoint()

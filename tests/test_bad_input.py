"""Bad input and faults (docs/bad-input.md): each gives one line and exit 2, or works with a one-line
note, and leaves nothing partial behind. Tiny models only; whatever can fail before the model loads
is made to fail there (the model path or loader is poisoned to prove it)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spdinv.editing
import spdinv.model
from spdinv.bench.results import read_rows
from spdinv.bench.runner import BenchOptions, EditOutcome, run_benchmark
from spdinv.bench.metrics import EvaluationModels
from spdinv.cli import main
from spdinv.editing.cache import InversionCache
from spdinv.images import open_image
from spdinv.outputs import write_manifest

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, message: str) -> bool:
    return code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails loudly: a check that passes this fixture ran before any model work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(spdinv.model, "load_model", refuse)


def invert_args(image, out, model, *extra):
    return ["invert", image, "--prompt", SOURCE, "--model", model, "--out", out, "--steps", "2", "--method", "ddim",
            "--quiet", *extra]


# ---------------------------------------------------------------- 6: 16-bit and float images


def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(tmp_path, tiny_dir, capsys):
    ramp = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image, notices = open_image(tmp_path / "deep.png")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.min() == 0 and 240 <= pixels.max() <= 255  # not all white
    assert notices == ["converted mode I;16 grey (values 0-4000, read as 12-bit) to 8-bit RGB"]
    full = (ramp.astype(np.float64) * 65535 / 4000).astype(np.uint16)
    Image.fromarray(full).save(tmp_path / "full.png")
    assert np.asarray(open_image(tmp_path / "full.png")[0]).max() == 255
    code, _, err = run(invert_args(tmp_path / "deep.png", tmp_path / "out", tiny_dir), capsys)
    assert code == 0 and "read as 12-bit" in err
    assert 100 < np.asarray(Image.open(tmp_path / "out" / "source.png")).mean() < 160


@pytest.mark.parametrize("values, expected", [((0.0, 1.0), "float grey in [0, 1]"), ((0.0, 200.0), "float grey in [0, 255]")])
def test_float_tiff_in_a_known_range_is_scaled(tmp_path, values, expected):
    ramp = np.linspace(*values, 64 * 64).reshape(64, 64).astype(np.float32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    image, notices = open_image(tmp_path / "f.tif")
    pixels = np.asarray(image)
    assert pixels.max() == round(values[1] / (1 if values[1] > 1 else 1 / 255)) and pixels.min() == 0
    assert notices == [f"converted {expected} to 8-bit RGB"]


@pytest.mark.parametrize("values, message", [((-5.0, 300.0), "float image with values in [-5, 300]; expected"),
                                             ((0.0, float("nan")), "non-finite pixel values")])
def test_float_tiff_out_of_range_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load, values, message):
    ramp = np.linspace(*values, 64 * 64).reshape(64, 64).astype(np.float32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    code, _, err = run(invert_args(tmp_path / "f.tif", tmp_path / "out", tmp_path), capsys)
    assert one_line_error(code, err, message) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 7: devices


@pytest.mark.parametrize("device, message", [
    ("cuda", "cuda: this torch build has no CUDA"), ("cuda:1", "this torch build has no CUDA"),
    ("mps", "mps: MPS is not available"), ("cdua", "unknown device 'cdua'"), ("meta", "unsupported device 'meta'"),
])
def test_unusable_devices_are_one_line(tmp_path, red_circle, capsys, monkeypatch, no_model_load, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, _, err = run(invert_args(red_circle, tmp_path / "out", tmp_path, "--device", device), capsys)
    assert one_line_error(code, err, message)


# ---------------------------------------------------------------- 8 and 12: refused before any compute


@pytest.mark.parametrize("extra, message", [
    (["--steps", "1001"], "--steps 1001 exceeds the 1000 timesteps"),
    (["--seed", str(2**64)], "argument --seed: must be in [0, 2**63 - 1]"),
    (["--delta", "-1e-6"], "argument --delta: must be > 0, got -1e-6"),
    (["--lr", "-.5"], "argument --lr: must be > 0, got -.5"),
    (["--out", "x" * 300], "output name too long (300 bytes"),
    (["--out", "/proc/spdinv-out"], "/proc is not writable"),
])
def test_bad_options_are_one_line_before_the_model_loads(tmp_path, tiny_dir, red_circle, capsys, monkeypatch,
                                                         no_model_load, extra, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(invert_args(red_circle, tmp_path / "out", tiny_dir, *extra), capsys)
    assert one_line_error(code, err, message) and not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_one_line(tmp_path, red_circle, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64x64 image stands for a 30000x30000 one
    code, _, err = run(invert_args(red_circle, tmp_path / "out", tmp_path), capsys)
    assert one_line_error(code, err, "image too large to decode")


@pytest.mark.parametrize("model, message", [
    ("missing/folder/model", "model path does not exist: missing/folder/model"),
    ("nobody/no-such-model", "is neither a folder nor a model in the Hugging Face cache"),
])
def test_a_mistyped_model_path_says_so(tmp_path, red_circle, capsys, model, message):
    code, _, err = run(invert_args(red_circle, tmp_path / "out", model), capsys)
    assert one_line_error(code, err, message) and "local_files_only" not in err


@pytest.mark.parametrize("make, message", [
    (lambda tmp: ["--work", tmp / "empty", "--export-only"], "no checkpoint in"),
    (lambda tmp: ["--work", tmp / "a-file"], "--work path is a file"),
    (lambda tmp: ["--work", tmp / "w", "--n-scenes", "0"], "--n-scenes must be > 0, got 0"),
    (lambda tmp: ["--work", tmp / "w", "--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (lambda tmp: ["--flow", "--work", tmp / "empty", "--export-only"], "no checkpoint in"),
    (lambda tmp: ["--flow", "--work", tmp / "w", "--flow-layers", "0"], "--flow-layers must be > 0, got 0"),
    (lambda tmp: ["--flow", "--work", tmp / "w", "--flow-export-every", "-1"], "--flow-export-every must be >= 0"),
    (lambda tmp: ["--flow", "--work", tmp / "w", "--seed", "-1"], "--seed must be in [0, "),
])
def test_world_train_bad_input_is_one_line(tmp_path, capsys, make, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    code, _, err = run(["world", "train", "--out", tmp_path / "model", *make(tmp_path)], capsys)
    assert one_line_error(code, err, message) and not (tmp_path / "model").exists()


# ---------------------------------------------------------------- 9 and 12: the benchmark


def echo_edit(request):
    return EditOutcome(request.image)


def bench_options(data: Path, out: Path) -> BenchOptions:
    return BenchOptions(data=data, out=out, inversions=["ddim"], engines=["none"], steps=2, metrics=["psnr", "mse"],
                        evaluation=EvaluationModels(dino=None, clip=None), progress=False)


def world_copy(tmp_path: Path) -> Path:
    from spdinv.world.dataset import export

    return export(tmp_path / "data", 3, seed=1)


def test_a_damaged_image_is_an_error_row_and_the_run_and_its_resume_go_on(tmp_path, tiny):
    data = world_copy(tmp_path)
    mapping = json.loads((data / "mapping_file.json").read_text())
    damaged = next(iter(mapping))
    path = data / "annotation_images" / mapping[damaged]["image_path"]
    path.write_bytes(path.read_bytes()[:80])  # the header survives, the pixel data does not
    summary = run_benchmark(bench_options(data, tmp_path / "out"), echo_edit, tiny)
    rows = {r["id"]: r for r in read_rows(summary.results)}
    assert len(rows) == 3 and summary.failed == 1
    assert rows[damaged]["error"].startswith("not a readable image") and rows[damaged]["psnr"] == "nan"
    assert all(r["error"] == "" for i, r in rows.items() if i != damaged)
    again = run_benchmark(bench_options(data, tmp_path / "out"), echo_edit, tiny)  # the resume
    assert (again.computed, again.skipped) == (0, 3)


def test_a_benchmark_prompt_that_is_a_number_is_one_line(tmp_path, capsys):
    data = world_copy(tmp_path)
    mapping = json.loads((data / "mapping_file.json").read_text())
    first = next(iter(mapping))
    mapping[first]["editing_prompt"] = 42
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    code, _, err = run(["bench", data, "--inversion", "ddim", "--engine", "none", "--out", tmp_path / "out"], capsys)
    assert one_line_error(code, err, f"item {first} in mapping_file.json: editing_prompt must be text, got 42")


# ---------------------------------------------------------------- 11: the inversion cache and NaN results


def test_a_damaged_cache_entry_is_dropped_and_recomputed(tmp_path, tiny, red_circle):
    image = Image.open(red_circle)
    cache = InversionCache(tmp_path / "cache")
    first, hit = cache.invert(tiny, image, SOURCE, "ddim", 3)
    entry = next(p for p in cache.root.iterdir() if not p.name.startswith("."))
    tensors = load_file(entry / "trajectory.safetensors")
    with safe_open(entry / "trajectory.safetensors", "pt") as handle:
        metadata = handle.metadata()
    tensors["trajectory"][1] = float("nan")
    save_file(tensors, entry / "trajectory.safetensors", metadata=metadata)
    (entry / ".spdinv-manifest.json").unlink()
    write_manifest(entry)  # the checksums agree: only the finite check can catch it
    second, hit = cache.invert(tiny, image, SOURCE, "ddim", 3)
    assert not hit and cache.dropped == 1 and torch.isfinite(second.trajectory).all()
    assert torch.allclose(second.trajectory, first.trajectory, atol=1e-6)  # recomputed: same machine, same shapes
    third, hit = cache.invert(tiny, image, SOURCE, "ddim", 3)
    assert hit and cache.dropped == 1
    (entry / "diagnostics.json").write_text("{}")  # changed behind the manifest's back
    assert not cache.invert(tiny, image, SOURCE, "ddim", 3)[1] and cache.dropped == 2


def test_a_nan_edit_is_an_error_and_writes_nothing(tmp_path, tiny_dir, red_circle, capsys, monkeypatch):
    real = spdinv.editing.run_editor

    def poisoned(*args, **kwargs):
        images, latents, seconds, rows = real(*args, **kwargs)
        return images * float("nan"), latents, seconds, rows

    monkeypatch.setattr(spdinv.editing, "run_editor", poisoned)
    args = ["edit", red_circle, "--source", SOURCE, "--target", TARGET, "--model", tiny_dir, "--steps", "2",
            "--inversion", "ddim", "--engine", "none", "--no-cache", "--out", tmp_path / "out", "--quiet"]
    code, out, err = run(args, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == "spdinv: error: the ddim + none result is not finite (NaN or inf)"
    assert "PSNR" not in out and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 13: quiet surprises, said in one line


def test_notes_for_float16_unknown_words_and_long_prompts_and_an_unusable_cache(tmp_path, tiny_dir, red_circle, capsys):
    (tmp_path / "cache-file").write_text("not a folder")
    long_target = TARGET + " with" + " red" * 50 + " zebra"
    args = ["edit", red_circle, "--source", SOURCE.replace("circle", "circel"), "--target", long_target,
            "--model", tiny_dir, "--steps", "2", "--inversion", "ddim", "--engine", "none", "--dtype", "float16",
            "--cache", tmp_path / "cache-file", "--out", tmp_path / "out", "--quiet"]
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 0, err
    assert any(line.startswith("warning: float16 on the CPU is several times slower") for line in lines)
    assert "warning: the model does not know these source prompt words: circel" in lines
    assert any(line.startswith("warning: the target prompt is") and "so it ignores: 'red red" in line for line in lines)
    assert any(line.startswith("warning: not caching inversions: cache path is a file") for line in lines)
    assert (tmp_path / "cache-file").read_text() == "not a folder"


def test_decoder_warnings_become_notes(tmp_path, red_circle, monkeypatch):
    real = ImageOps.exif_transpose

    def warning_transpose(image):
        warnings.warn("Corrupt EXIF data.  Expecting to read 12 bytes but only got 6.", UserWarning)
        return real(image)

    monkeypatch.setattr(ImageOps, "exif_transpose", warning_transpose)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        _, notices = open_image(red_circle)
    assert notices == ["Corrupt EXIF data. Expecting to read 12 bytes but only got 6."] and not escaped


def test_world_export_over_an_old_export_leaves_no_stale_images(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["world", "export", str(out), "--n", "12"]) == 0
    assert main(["world", "export", str(out), "--n", "2"]) == 0
    assert len(list(out.rglob("*.png"))) == 4 and len(json.loads((out / "mapping_file.json").read_text())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    capsys.readouterr()


# ---------------------------------------------------------------- concept encoders (spdinv concept encode, edit)


def encode_args(image, out, *extra):
    return ["concept", "encode", image, "--out", out, "--quiet", *extra]


def edit_with_encoder_args(image, out, model, *extra):
    return ["edit", image, "--source", "a large S in the centre on a white background",
            "--target", "a large S in the centre on a black background", "--model", model, "--out", out,
            "--steps", "2", "--inversion", "ddim", "--no-cache", "--quiet", *extra]


def elite_checkpoint(tmp_path: Path, unet, change=None) -> Path:
    from spdinv.elite import GlobalMapper

    state = GlobalMapper.for_unet(unet, input_dim=8, hidden=12).state_dict()
    if change:
        change(state)
    torch.save(state, tmp_path / "global_mapper.pt")
    return tmp_path / "global_mapper.pt"


def clip_folder(tmp_path: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=17, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_an_elite_checkpoint_with_wrong_keys_is_one_line(tmp_path, tiny_dir, red_circle, capsys):
    from spdinv.testing import tiny_pipeline

    mapper = elite_checkpoint(tmp_path, tiny_pipeline().unet, lambda s: s.pop("mapping_2.3.weight"))
    clip = clip_folder(tmp_path)
    capsys.readouterr()  # saving the folder's progress bar
    code, _, err = run(edit_with_encoder_args(red_circle, tmp_path / "out", tiny_dir, "--concept-encoder", mapper,
                                              "--image-encoder", clip), capsys)
    assert one_line_error(code, err, "is not an ELITE global mapper for this model: 1 keys missing")
    assert not (tmp_path / "out").exists()


def test_a_spdinv_encoder_with_wrong_keys_is_one_line(tmp_path, red_circle, no_model_load, capsys):
    from spdinv.world.concept_encoder import ENCODER_PATH

    state = load_file(ENCODER_PATH)
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "enc.safetensors")
    (tmp_path / "enc.json").write_text(ENCODER_PATH.with_suffix(".json").read_text())
    code, _, err = run(encode_args(red_circle, tmp_path / "S.safetensors", "--concept-encoder",
                                   tmp_path / "enc.safetensors"), capsys)
    assert one_line_error(code, err, "is not a concept encoder of this shape: 0 keys missing")


def test_a_corrupt_encoder_safetensors_is_one_line(tmp_path, red_circle, no_model_load, capsys):
    from spdinv.world.concept_encoder import ENCODER_PATH

    (tmp_path / "enc.safetensors").write_bytes(ENCODER_PATH.read_bytes()[:5000])  # truncated
    (tmp_path / "enc.json").write_text(ENCODER_PATH.with_suffix(".json").read_text())
    code, _, err = run(encode_args(red_circle, tmp_path / "S.safetensors", "--concept-encoder",
                                   tmp_path / "enc.safetensors"), capsys)
    assert one_line_error(code, err, "is not a readable safetensors file")
    assert not (tmp_path / "S.safetensors").exists()


@pytest.mark.parametrize("command", ["encode", "edit"])
def test_a_concept_image_that_cannot_be_read_is_one_line(tmp_path, tiny_dir, red_circle, no_model_load, capsys,
                                                         command):
    from spdinv.world.concept_encoder import ENCODER_PATH

    (tmp_path / "junk.png").write_bytes(b"not a png")
    if command == "encode":
        args = encode_args(tmp_path / "junk.png", tmp_path / "S.safetensors")
    else:
        args = edit_with_encoder_args(red_circle, tmp_path / "out", tiny_dir, "--concept-encoder", ENCODER_PATH,
                                      "--concept-image", tmp_path / "junk.png")
    code, _, err = run(args, capsys)
    assert one_line_error(code, err, "not a readable image")


@pytest.mark.parametrize("extra, message", [
    (["--concept", "S.safetensors"], "--concept and --concept-encoder are alternatives"),
    ([], "--image-encoder (the CLIP vision model folder) is needed"),
])
def test_encoder_flag_combinations_are_one_line(tmp_path, tiny_dir, red_circle, no_model_load, capsys, extra,
                                                message):
    (tmp_path / "global_mapper.pt").write_bytes(b"not read before the flags are checked")
    code, _, err = run(edit_with_encoder_args(red_circle, tmp_path / "out", tiny_dir, "--concept-encoder",
                                              tmp_path / "global_mapper.pt", *extra), capsys)
    assert one_line_error(code, err, message)


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch must be > 0, got 0"),
    (["--w0-only", "1.5"], "--w0-only must be in [0, 1], got 1.5"),
    (["--teacher", "-0.5"], "--teacher must be in [0, 1], got -0.5"),
    (["--attributes", "-1"], "--attributes must be >= 0, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0, got nan"),
    (["--drawn", "1.5"], "--drawn must be in [0, 1], got 1.5"),
    (["--word-teacher", "-1"], "--word-teacher must be >= 0, got -1.0"),
    (["--diffusion", "-1"], "--diffusion must be >= 0, got -1.0"),
    (["--start", "missing.safetensors"], "--start: concept encoder not found: missing.safetensors"),
    (["--word-teacher", "1"], "--word-teacher needs --start"),
])
def test_concept_encoder_training_settings_are_one_line(tmp_path, capsys, extra, message):
    code, _, err = run(["world", "train-concept-encoder", "--out", tmp_path / "enc", *extra], capsys)
    assert one_line_error(code, err, message) and not (tmp_path / "enc").exists()


def test_concept_encoder_training_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(["world", "train-concept-encoder", "--out", tmp_path / "file"], capsys)
    assert one_line_error(code, err, "--out must be a folder")

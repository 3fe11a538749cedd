import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from spdinv.cli import main

PROMPT = "a large red circle in the centre on a white background"


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def invert_args(image, out, model, *extra):
    return ["invert", image, "--prompt", PROMPT, "--model", model, "--out", out, "--steps", "4", "--quiet", *extra]


def test_invert_writes_every_output(tmp_path, tiny_dir, red_circle, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(invert_args(red_circle, out, tiny_dir, "--K", "3"), capsys)
    assert code == 0 and "noise error" in stdout
    assert {p.name for p in out.iterdir()} == {"z_T.safetensors", "trajectory.safetensors", "diagnostics.json",
                                               "config.json", "reconstruction.png", "residuals.png", "source.png",
                                               ".spdinv-manifest.json"}
    trajectory = load_file(out / "trajectory.safetensors")["trajectory"]
    assert trajectory.shape == (5, 4, 8, 8)
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert len(diagnostics["steps"]) == 4 and diagnostics["noise_error"] > 0
    assert {"residual_before", "residual_after", "iterations", "network_calls", "seconds"} <= set(diagnostics["steps"][0])
    config = json.loads((out / "config.json").read_text())
    assert config["K"] == 3 and config["method"] == "spdinv" and config["prompt"] == PROMPT
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_same_seed_identical_files(tmp_path, tiny_dir, red_circle, capsys):
    for name in ("a", "b"):
        assert run(invert_args(red_circle, tmp_path / name, tiny_dir, "--K", "2", "--seed", "7"), capsys)[0] == 0
    for file in ("z_T.safetensors", "trajectory.safetensors"):
        a, b = load_file(tmp_path / "a" / file), load_file(tmp_path / "b" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: ("missing.png", []), "image not found"),
        (lambda d: (d / "notes.txt", []), "not a readable image"),
        (lambda d: (d / "img.png", ["--method", "magic"]), "valid: ddim"),
        (lambda d: (d / "img.png", ["--K", "0"]), "--K"),
        (lambda d: (d / "img.png", ["--lr", "-0.1"]), "--lr"),
        (lambda d: (d / "img.png", ["--delta", "0"]), "--delta"),
        (lambda d: (d / "img.png", ["--steps", "0"]), "--steps"),
        (lambda d: (d / "img.png", ["--method", "ddim", "--K", "5"]), "do not apply to ddim"),
        (lambda d: (d / "img.png", ["--optimizer", "lbfgs"]), "unknown optimizer"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, tiny_dir, red_circle, capsys, make_bad, message):
    (tmp_path / "notes.txt").write_text("not an image")
    Image.open(red_circle).save(tmp_path / "img.png")
    image, extra = make_bad(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(invert_args(tmp_path / image if isinstance(image, str) else image, out, tiny_dir, *extra), capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_empty_prompt_and_output_path_that_is_a_file(tmp_path, tiny_dir, red_circle, capsys):
    code, _, err = run(["invert", red_circle, "--prompt", " ", "--model", tiny_dir, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "prompt is empty" in err
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, _, err = run(invert_args(red_circle, blocker, tiny_dir), capsys)
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_failure_leaves_existing_outputs_untouched(tmp_path, tiny_dir, red_circle, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(invert_args(red_circle, out, tiny_dir, "--K", "2"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import spdinv.export

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(spdinv.export, "plot_residuals", explode)
    with pytest.raises(RuntimeError):
        main([str(a) for a in invert_args(red_circle, out, tiny_dir, "--K", "3")])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mode, size, flags, note, fitted", [
    ("RGBA", (64, 64), [], "transparency", (32, 32)), ("L", (64, 64), [], "mode L", (32, 32)),
    # the tiny model: 32 px native, sides multiples of 8 (VAE 4 x one UNet downsampling); 90x50 keeps its
    # aspect ratio: 40x24 (5:3, the nearest to 9:5 of the sizes round 42.9x23.9), 83x50 of it centre-cropped
    ("RGB", (90, 50), [], "centre-cropped 90x50 to 83x50", (40, 24)),
    ("RGB", (90, 50), ["--crop"], "centre-cropped 90x50 to 50x50", (32, 32)),
    ("RGB", (90, 50), ["--size", "48x32"], "resized 75x50 to 48x32", (48, 32))])
def test_odd_images_are_converted_with_a_notice(tmp_path, tiny_dir, capsys, mode, size, flags, note, fitted):
    array = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    path = tmp_path / "odd.png"
    Image.fromarray(array.squeeze(), mode).save(path)
    code, _, err = run(invert_args(path, tmp_path / "out", tiny_dir, "--method", "ddim", *flags), capsys)
    assert code == 0 and note in err
    for name in ("source.png", "reconstruction.png"):
        assert Image.open(tmp_path / "out" / name).size == fitted


@pytest.mark.parametrize("flags, message", [(["--size", "50x32"], "multiples of 8 px for this model (e.g. 48x32)"),
                                            (["--size", "wide"], "WIDTHxHEIGHT"),
                                            (["--size", "48x32", "--crop"], "not allowed with")])
def test_bad_sizes_are_one_line_errors(tmp_path, tiny_dir, red_circle, capsys, flags, message):
    code, _, err = run(invert_args(red_circle, tmp_path / "out", tiny_dir, "--method", "ddim", *flags), capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_the_executable_pauses_the_collector_only_to_parse_and_exits_with_mains_status(monkeypatch):
    """`spdinv` (cli.run): the cyclic GC is off while the command line is parsed (the heavy
    imports), then on again with the start-up objects frozen; the exit runs the atexit handlers
    and passes the command's status to os._exit."""
    import gc
    import os

    import spdinv.cli

    class Exited(Exception):
        pass

    seen, exits = {}, []
    monkeypatch.setattr(spdinv.cli, "parse", lambda argv=None: seen.setdefault("collecting", gc.isenabled()) or 3)
    monkeypatch.setattr(spdinv.cli.atexit, "_run_exitfuncs", lambda: exits.append("atexit"))

    def exit_(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", exit_)
    try:
        with pytest.raises(Exited):
            spdinv.cli.run()
        assert seen == {"collecting": False} and gc.isenabled() and gc.get_freeze_count() > 0
        assert exits == ["atexit", 3]
    finally:
        gc.unfreeze()
        gc.enable()


def test_solver_flag_is_listed_and_reaches_the_inversion(tmp_path, tiny_dir, red_circle, capsys):
    from spdinv.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["invert"].format_help()
    assert "--solver {gradient,anderson,hybrid,polyak,newton_krylov}" in help_text
    out = tmp_path / "out"
    code, _, _ = run(invert_args(red_circle, out, tiny_dir, "--solver", "anderson"), capsys)
    assert code == 0 and json.loads((out / "config.json").read_text())["solver"] == "anderson"
    code, _, err = run(invert_args(red_circle, tmp_path / "bad", tiny_dir, "--solver", "nope"), capsys)
    assert code == 2 and "invalid choice: 'nope'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["invert", "edit", "bench", "demo"])
def test_help_lists_which_inversions_and_engines_run_on_which_family(command):
    """Each command's help closes with, for each supported family, the inversions and engines that
    run on it: those `applies_to` / `engine_applies_to` give (pnp on UNets only, rf_edit and the flow
    inversions on flow transformers only, null_text and negative_prompt not on FLUX)."""
    import re

    from spdinv.cli import build_parser
    from spdinv.editing import ENGINES, engine_applies_to
    from spdinv.families import FLUX, SD, SD3, SUPPORTED_FAMILIES
    from spdinv.inversion import METHODS, applies_to

    help_text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    listed = help_text[help_text.index("which inversions and engines run on which model family"):]
    found = {}
    for entry in re.findall(r"^  (\S.*?)(?=^  \S|\Z)", listed, re.S | re.M):
        families, inversions, engines = re.fullmatch(r"(.*): inversions (.*); engines (.*)",
                                                     " ".join(entry.split())).groups()
        names = [{n.strip() for n in re.sub(r"\s*\([^)]*\)", "", text).split(",")} for text in (inversions, engines)]
        found.update({family.name: names for family in SUPPORTED_FAMILIES if family.name in families})
    assert set(found) == {family.name for family in SUPPORTED_FAMILIES}
    for family in SUPPORTED_FAMILIES:
        assert found[family.name] == [{m for m in METHODS if applies_to(family, m)},
                                      {e for e in ENGINES if engine_applies_to(family, e)}], family.name
    (sd_inversions, sd_engines), (sd3_inversions, sd3_engines) = found[SD.name], found[SD3.name]
    assert "pnp" in sd_engines and "rf_edit" not in sd_engines and "rf_edit" in sd3_engines and "pnp" not in sd3_engines
    assert "rf_solver" in sd3_inversions and "rf_solver" not in sd_inversions
    assert "null_text" in sd3_inversions and "null_text" not in found[FLUX.name][0]

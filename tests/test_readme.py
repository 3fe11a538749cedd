"""The README's library snippet runs as written (at 3 steps instead of 50: the test substitutes the
step count, and fails if the snippet no longer names it in each call), and `reconstruct()` reports
the PSNR `spdinv invert` reports for the same inversion: one definition, against the input image."""

import json
import os
import re
from pathlib import Path

import pytest

from spdinv.cli import main

ROOT = Path(__file__).resolve().parents[1]


def library_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_snippet_runs(monkeypatch, capsys):
    code, replaced = re.subn(r"num_steps=50\b", "num_steps=3", library_snippet())
    assert replaced == 4  # invert, edit (plain and with a preset) and edits each name their steps
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 + 4  # invert's costs, reconstruct's PSNR, the edit's rows, four edits
    assert namespace["recon"].reference.startswith("the input image")
    assert namespace["inversion"].total_calls > namespace["inversion"].network_calls > 0
    assert namespace["edited"].size == namespace["image"].size


def test_reconstruct_reports_the_psnr_spdinv_invert_reports(tmp_path, tiny_dir, red_circle, capsys):
    from PIL import Image

    from spdinv.inversion import invert, reconstruct
    from spdinv.model import load_model

    prompt = "a large red circle in the centre on a white background"
    out = tmp_path / "out"
    assert main(["invert", str(red_circle), "--prompt", prompt, "--model", str(tiny_dir), "--steps", "4", "--K", "3",
                 "--out", str(out), "--quiet"]) == 0
    printed = float(re.search(r"reconstruction PSNR ([\d.]+) dB", capsys.readouterr().out).group(1))
    written = json.loads((out / "diagnostics.json").read_text())["reconstruction_psnr"]
    model = load_model(str(tiny_dir))
    for image in (Image.open(red_circle), str(red_circle)):  # a PIL image or its path: the same inversion
        recon = reconstruct(model, invert(model, image, prompt, "spdinv", 4, K=3, progress=False))
        assert recon.psnr == pytest.approx(written, rel=1e-6) and f"{recon.psnr:.2f}" == f"{printed:.2f}"


def test_the_readme_names_every_solver_of_SOLVERS():
    """The solver names live in `solvers.SOLVERS` (the help is generated from it); the README's
    synopses list its choices and its `--solver` paragraph describes each one."""
    from spdinv.inversion.solvers import SOLVERS

    readme = (ROOT / "README.md").read_text()
    choices = set(re.findall(r"--solver \{([a-z_,]+)\}", readme))
    assert choices == {",".join(SOLVERS)}
    start = readme.index("`--solver` picks")
    paragraph = readme[start:readme.index("\n\n", start)]
    assert all(f"`{name}`" in paragraph for name in SOLVERS), [n for n in SOLVERS if f"`{n}`" not in paragraph]


def test_the_readme_family_table_lists_what_runs_on_each_family():
    """The README's table of which inversions and engines apply to which model family names exactly
    those `inversion.applies_to` and `editing.engine_applies_to` give (a note in brackets aside), one
    row for each supported family, the shipped models in the row of their family."""
    from spdinv.commands.common import shipped_families
    from spdinv.editing import family_choices
    from spdinv.families import FLUX, SD, SD3, SDXL, SUPPORTED_FAMILIES

    readme = (ROOT / "README.md").read_text()
    start = readme.index("**Which inversions and engines apply to which model family**")
    table = readme[readme.index("\n|", start):readme.index("\n\n", readme.index("\n|", start))]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    labels = {"SD 1.x": SD, "SDXL": SDXL, "SD3": SD3, "FLUX.1": FLUX}
    assert set(labels.values()) == set(SUPPORTED_FAMILIES)

    def names(cell: str) -> set[str]:
        return {name.strip() for name in re.sub(r"\s*\([^)]*\)", "", cell).split(",")}

    seen = []
    for family_cell, inversions, engines in rows:
        families = [family for label, family in labels.items() if label in family_cell]
        shipped = set(re.findall(r"`([\w-]+)`", family_cell))
        for family in families:
            choices = family_choices(family)
            assert names(inversions) == set(choices.inversions), (family.name, inversions)
            assert names(engines) == set(choices.engines), (family.name, engines)
        assert {shipped_families()[name] for name in shipped} <= set(families), family_cell
        seen += families
    assert sorted(f.name for f in seen) == sorted(f.name for f in SUPPORTED_FAMILIES)  # each family in one row
    assert set(shipped_families()) == {name for row in rows for name in re.findall(r"`([\w-]+)`", row[0])}

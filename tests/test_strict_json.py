"""Every JSON file spdinv writes is strict JSON: a value that is not a finite number (a residual
that was not measured, an infinite PSNR) is null, never Python's NaN / Infinity."""

import json
import math

import pytest
from PIL import Image

from spdinv.editing import edit
from spdinv.editing.cache import InversionCache
from spdinv.export import load_inversion
from spdinv.outputs import to_json

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null():
    import numpy as np
    import torch

    data = {"nan": math.nan, "inf": [1.0, -math.inf], "tensor": torch.tensor(math.nan), "numpy": np.float32("inf")}
    assert strict(to_json(data)) == {"nan": None, "inf": [1.0, None], "tensor": None, "numpy": None}


def test_the_inversion_cache_writes_strict_json_and_reads_it_back(tiny, red_circle, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    result = edit(tiny, Image.open(red_circle), SOURCE, TARGET, "ddim", "none", num_steps=3, cache=cache)
    assert math.isnan(result.inversion.steps[0].residual_after)  # not diagnosed: nothing measured
    (entry,) = (tmp_path / "cache").iterdir()
    diagnostics = strict((entry / "diagnostics.json").read_text())
    assert diagnostics["steps"][0]["residual_after"] is None and diagnostics["noise_error"] is None
    loaded = load_inversion(entry, tiny)
    assert math.isnan(loaded.steps[0].residual_after)
    again = edit(tiny, Image.open(red_circle), SOURCE, TARGET, "ddim", "none", num_steps=3, cache=cache)
    assert again.cache_hit


@pytest.mark.parametrize("method", ["ddim", "spdinv"])
def test_spdinv_invert_writes_strict_json(tmp_path, tiny_dir, red_circle, method):
    from spdinv.cli import main

    out = tmp_path / "out"
    assert main(["invert", str(red_circle), "--prompt", SOURCE, "--model", str(tiny_dir), "--steps", "3",
                 "--method", method, "--out", str(out), "--quiet"]) == 0
    for name in ("diagnostics.json", "config.json"):
        strict((out / name).read_text())

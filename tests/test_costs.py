"""Every reported cost is the number of UNet rows evaluated: a forward pre-hook on every UNet
counts the rows of each call (its batch size), and what the library, `spdinv invert`,
`spdinv edit` and `spdinv bench` report must equal it. No work is done twice."""

import csv
import re
from contextlib import contextmanager

import pytest
from diffusers import UNet2DConditionModel
from torch.nn.modules.module import register_module_forward_pre_hook

from spdinv.cli import main
from spdinv.editing import edit, edits
from spdinv.editing.cache import InversionCache
from spdinv.inversion import invert, reconstruct
from spdinv.testing import DIFFUSION_METHODS, UNET_ENGINES


SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
FAST = {"spdinv": {"K": 3}, "aidi": {"iterations": 3}, "null_text": {"inner_steps": 2}}


@contextmanager
def counted_rows():
    """The UNet rows evaluated inside the block, by any UNet (also one a command loads itself)."""
    rows = [0]

    def count(module, args):
        if isinstance(module, UNet2DConditionModel):
            rows[0] += args[0].shape[0]

    handle = register_module_forward_pre_hook(count)
    try:
        yield rows
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def image(red_circle):
    from PIL import Image

    return Image.open(red_circle).convert("RGB")


@pytest.mark.parametrize("method", DIFFUSION_METHODS)  # the tiny model is SD
@pytest.mark.parametrize("diagnose", [False, True])
def test_an_inversion_reports_every_row_it_evaluated(tiny, image, method, diagnose):
    with counted_rows() as rows:
        inversion = invert(tiny, image, SOURCE, method, 4, progress=False, diagnose=diagnose, **FAST.get(method, {}))
    assert inversion.total_calls == rows[0]
    assert inversion.network_calls + inversion.diagnostic_calls == rows[0]
    assert (inversion.diagnostic_calls > 0) == diagnose


def test_reconstructing_a_diagnosed_inversion_samples_nothing_again(tiny, image):
    inversion = invert(tiny, image, SOURCE, "ddim", 4, progress=False)
    with counted_rows() as rows:
        recon = reconstruct(tiny, inversion)
    assert rows[0] == recon.network_calls == 0
    with counted_rows() as rows:
        again = reconstruct(tiny, inversion, guidance_scale=2.0)  # another reconstruction: sampled and counted
    assert rows[0] == again.network_calls == 4 * 2


@pytest.mark.parametrize("engine", UNET_ENGINES)
def test_an_edit_reports_every_row_it_evaluated(tiny, image, engine):
    with counted_rows() as rows:
        result = edit(tiny, image, SOURCE, TARGET, "spdinv", engine, num_steps=4, K=3)
    assert result.network_calls == rows[0]
    assert result.network_calls_by["invert"] == result.inversion.network_calls


def test_edits_count_each_inversion_once_and_a_cache_hit_as_nothing(tiny, image, tmp_path):
    cache = InversionCache(tmp_path / "cache")
    with counted_rows() as rows:
        results = list(edits(tiny, image, SOURCE, TARGET, ["ddim", "null_text"], ["p2p", "pnp"], num_steps=3,
                             cache=cache, diagnose=True, inversion_options={"null_text": {"inner_steps": 2}}))
    assert sum(r.network_calls for r in results) == rows[0]
    with counted_rows() as rows:
        again = list(edits(tiny, image, SOURCE, TARGET, ["ddim"], ["p2p"], num_steps=3, cache=cache))
    assert again[0].cache_hit and again[0].network_calls_by["invert"] == 0 == again[0].network_calls_by["diagnostics"]
    assert again[0].network_calls == rows[0] > 0


def test_spdinv_invert_prints_every_row_it_evaluated(tmp_path, tiny_dir, red_circle, capsys):
    with counted_rows() as rows:
        code = main(["invert", str(red_circle), "--prompt", SOURCE, "--model", str(tiny_dir), "--steps", "4",
                     "--K", "3", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    printed = int(re.search(r"(\d+) network calls", capsys.readouterr().out).group(1))
    assert printed == rows[0]


def test_spdinv_edit_prints_every_row_it_evaluated(tmp_path, tiny_dir, red_circle, capsys):
    with counted_rows() as rows:
        code = main(["edit", str(red_circle), "--source", SOURCE, "--target", TARGET, "--model", str(tiny_dir),
                     "--steps", "3", "--inversion", "ddim", "--engine", "all", "--out", str(tmp_path / "out"),
                     "--no-cache", "--quiet"])
    assert code == 0
    printed = [int(n) for n in re.findall(r"(\d+) network calls", capsys.readouterr().out)]
    assert len(printed) == len(UNET_ENGINES) and sum(printed) == rows[0]


def test_bench_rows_report_every_row_evaluated(tmp_path, tiny):
    from spdinv.bench.runner import BenchOptions, run_benchmark
    from spdinv.world.dataset import export

    data = export(tmp_path / "world", 1, seed=0)
    options = BenchOptions(data=data, out=tmp_path / "out", inversions=["spdinv"], engines=["p2p", "pnp"], steps=3,
                           metrics=["network_calls", "diagnostic_calls", "edit_calls"],
                           inversion_options={"K": 3}, progress=False)
    with counted_rows() as rows:
        run_benchmark(options, model=tiny)
    with open(tmp_path / "out" / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and len({r["network_calls"] for r in table}) == 1  # the engines share the inversion
    inversion = float(table[0]["network_calls"]) + float(table[0]["diagnostic_calls"])
    assert float(table[0]["diagnostic_calls"]) > 0  # diagnostics are on by default
    assert inversion + sum(float(r["edit_calls"]) for r in table) == rows[0]

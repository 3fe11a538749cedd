"""What `invert()` / `edit()` accept: a path, a PIL image, a numpy array or a (1, 3, H, W) tensor in
[-1, 1]; anything else (None, 4 channels, 0-255 values, NaN, a seed torch cannot take, a prompt the
tokenizer reads as nothing) is a one-line SpdinvError before any network runs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from spdinv.commands.common import prompt_warnings
from spdinv.editing import edit
from spdinv.errors import SpdinvError
from spdinv.inversion import image_tensor, invert
from spdinv.testing import unet_batch_sizes

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


@pytest.fixture(scope="module")
def pil(red_circle):
    return Image.open(red_circle).convert("RGB")


def test_a_path_an_array_and_a_pil_image_are_the_same_image(tiny, red_circle, pil):
    fitted = image_tensor(tiny, pil)  # conformed to the model's size, in [-1, 1]
    ways = [pil, red_circle, str(red_circle), np.asarray(pil), np.asarray(pil) / 255.0, fitted, fitted[0]]
    trajectories = [invert(tiny, image, SOURCE, "ddim", 2, progress=False, diagnose=False).trajectory for image in ways]
    for trajectory in trajectories[1:]:
        assert torch.equal(trajectory, trajectories[0])  # the same pixels, the same computation and shapes


@pytest.mark.parametrize("image, message", [
    (None, "got None"),
    (42, "got int"),
    (torch.zeros(1, 4, 64, 64), "must be (1, 3, H, W)"),
    (torch.full((1, 3, 64, 64), 200.0), "expected [-1, 1] (0-255 values"),
    (torch.full((1, 3, 64, 64), math.nan), "NaN"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "must be float"),
    (np.zeros((64, 64, 5), np.uint8), "(H, W, 3)"),
    (np.full((64, 64, 3), -3.0), "expected 0-255"),
    ("no/such/image.png", "image not found"),
])
def test_bad_images_are_one_line_errors_before_any_network_runs(tiny, image, message):
    with unet_batch_sizes(tiny.unet) as calls, pytest.raises(SpdinvError) as error:
        invert(tiny, image, SOURCE, "ddim", 2, progress=False)
    assert message in str(error.value) and "\n" not in str(error.value) and calls == []
    with pytest.raises(SpdinvError) as error:  # edit(): None means "no image" (an Inversion may stand in)
        edit(tiny, image, SOURCE, TARGET, "ddim", "none", num_steps=2)
    assert (message if image is not None else "an image is needed") in str(error.value)


@pytest.mark.parametrize("seed", [2**63, -1, 1.5, "7", True])
def test_a_seed_torch_cannot_take_is_one_line(tiny, pil, seed):
    with pytest.raises(SpdinvError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        invert(tiny, pil, SOURCE, "ddim", 2, seed=seed, progress=False)
    with pytest.raises(SpdinvError, match="seed"):
        edit(tiny, pil, SOURCE, TARGET, "ddim", "none", num_steps=2, seed=seed)


@pytest.mark.parametrize("prompt", ["🔴🔵", "\u200b\u200b", "🙂 \u200b"])
def test_prompts_the_tokenizer_reads_as_nothing_are_refused(embedded, pil, prompt):
    with pytest.raises(SpdinvError, match="has no word the model's tokenizer reads"):
        invert(embedded, pil, prompt, "ddim", 2, progress=False)
    with pytest.raises(SpdinvError, match="target prompt .* has no word"):
        edit(embedded, pil, SOURCE, prompt, "ddim", "none", num_steps=2)


def test_characters_read_as_unknown_mid_prompt_are_warned(embedded):
    warnings = prompt_warnings(embedded, "a large red 🔴 circle in the centre on a white\u200b background")
    assert len(warnings) == 1 and "'🔴'" in warnings[0] and "white\\u200b" in warnings[0]
    assert prompt_warnings(embedded, SOURCE) == []


@pytest.fixture(scope="module")
def embedded():
    from spdinv.model import load_model

    return load_model()

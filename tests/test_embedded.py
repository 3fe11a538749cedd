"""The shipped shapes-world model: stock diffusers loads it, and edits on it do what they say
(judged by the shipped attribute classifier against the world's exact ground truth)."""

import numpy as np
import pytest
import torch

from spdinv.model import EMBEDDED_MODEL, load_model
from spdinv.testing import hand_drawn_square
from spdinv.world.classifier import compare, load_classifier, read_scenes
from spdinv.world.render import render
from spdinv.world.captions import Phrasing
from spdinv.world.edits import EditPair
from spdinv.world.scene import Scene, WorldObject

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(), reason="embedded model not built")


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_stock_diffusers_loads_and_generates(classifier):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle on a white background", num_inference_steps=25,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 64, 64)
    reading = read_scenes(classifier, images * 2 - 1)[0]
    assert reading.background == "white"
    assert [(o["shape"], o["colour"]) for o in reading.objects.values()] == [("circle", "red")]


def background_psnr(edited: torch.Tensor, target_image, mask: np.ndarray) -> float:
    """PSNR (data range 1) over the pixels outside the ground-truth edit mask."""
    target = torch.from_numpy(np.asarray(target_image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    keep = torch.from_numpy(mask == 0)
    mse = float(((edited[0] + 1) / 2 - target)[:, keep].pow(2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


EDITS = {
    # engine: (source scene, target scene, blend words, engine options)
    "p2p": (Scene((WorldObject("circle", "red", "centre"),), "white"),
            Scene((WorldObject("circle", "blue", "centre"),), "white"), "circle circle", {}),
    # MasaCtrl keeps the source's appearance (colour) while the target prompt changes the shape
    "masactrl": (Scene((WorldObject("circle", "red", "centre"),), "white"),
                 Scene((WorldObject("square", "red", "centre"),), "white"), "circle square", {}),
    # PnP keeps the source's layout (injected decoder features) while the target prompt changes the material
    "pnp": (Scene((WorldObject("circle", "red", "centre"),), "white"),
            Scene((WorldObject("circle", "red", "centre", material="striped"),), "white"), "circle circle", {}),
}


@pytest.mark.parametrize("engine", list(EDITS))
def test_spdinv_edit_on_the_embedded_model(model, classifier, engine):
    from spdinv.editing import edit

    source, target, blend, options = EDITS[engine]
    pair = EditPair(source, target, Phrasing(), "6", "", blend)
    if engine == "p2p":
        options = dict(options, blend=blend)
    result = edit(model, render(source), pair.source_prompt, pair.target_prompt, "spdinv", engine, **options)
    reading = read_scenes(classifier, result.edited)[0]
    assert compare(reading, target)["all"], reading
    assert background_psnr(result.edited, render(target), pair.mask()) >= 25.0


@pytest.mark.parametrize("engine", ["p2p", "masactrl", "none"])
def test_direct_inversion_reconstructs_as_well_as_ddim_on_a_drawn_image(model, engine):
    """DirectInversion's source branch walks the inverted trajectory in the edit's own batch, so its
    reconstruction is at least DDIM's (the regression: offsets recorded in a batch of 2 and added
    in a batch of 3-4 left a coloured blob, 16.6 dB against DDIM's ~30, on CPUs that round the two
    shapes differently)."""
    from spdinv.editing import edit
    from spdinv.images import psnr, to_tensor
    from spdinv.inversion import invert

    image = hand_drawn_square()
    source = "a large purple square in the centre on a brown background"
    target = "a large purple triangle in the centre on a brown background"
    options = dict(blend="square triangle") if engine == "p2p" else {}
    scores = {}
    for method in ("ddim", "direct"):
        inversion = invert(model, image, source, method, 20, progress=False, diagnose=False)
        result = edit(model, None, source, target, inversion, engine, **options)
        scores[method] = psnr(result.reconstruction, to_tensor(image))
    assert scores["ddim"] > 24.0, scores
    assert scores["direct"] >= scores["ddim"] - 0.5, scores


def drawn_wide_circle(width: int, height: int) -> tuple["Image.Image", tuple[float, float, float]]:
    """A red circle (radius 0.22 of the height) in the centre of a white width x height frame, drawn with
    PIL; (image, (cx, cy, r) as fractions of width, height, height)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (245, 245, 245))
    r = 0.22 * height
    ImageDraw.Draw(image).ellipse((width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r), fill=(220, 40, 40))
    return image, (0.5, 0.5, 0.22)


@pytest.mark.parametrize("width, height", [(96, 64), (64, 96)])
def test_a_non_square_image_is_edited_at_its_own_shape(model, classifier, width, height):
    """Issue 27: a landscape or portrait drawing keeps its aspect ratio (96x64 -> 80x48 on this 64-px model,
    sides multiples of 16); the edit is right: the pixels say so across the whole frame (blue inside
    the drawn circle, white in the margins a square crop would have cut), and the classifier reads a
    blue object, no red one, on white from the centre square of the edit. (The model was trained on
    64x64 images only: at 80x48 its circle comes out a little off-centre with a faint rim, and the
    resized crop's shape and count are not read reliably, so only colours are checked.)"""
    from spdinv.editing import edit

    image, (cx, cy, r) = drawn_wide_circle(width, height)
    source, target = ("a large red circle in the centre on a white background",
                      "a large blue circle in the centre on a white background")
    result = edit(model, image, source, target, "ddim", "p2p", blend="circle circle")  # spdinv: the same, 5x slower
    fitted = (48, 80) if height > width else (80, 48)
    assert tuple(result.edited.shape[-2:]) == fitted[::-1] and tuple(result.mask.shape[-2:]) == (fitted[1] // 4, fitted[0] // 4)
    pixels = (result.edited[0] + 1) / 2  # (3, H, W) in [0, 1]
    h, w = pixels.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    short = min(h, w)
    inside = (xs - cx * w) ** 2 + (ys - cy * h) ** 2 < (0.6 * r * short) ** 2
    margin = (xs < 0.15 * w) | (xs > 0.85 * w) if w > h else (ys < 0.15 * h) | (ys > 0.85 * h)
    red, green, blue = (pixels[c][inside].mean() for c in range(3))
    assert blue > red + 0.3 and blue > green + 0.2, (red, green, blue)
    assert pixels[:, margin].mean() > 0.85
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = torch.nn.functional.interpolate(result.edited[:, :, top:top + side, left:left + side], size=(64, 64),
                                             mode="bilinear", antialias=True)
    reading = read_scenes(classifier, square)[0]
    colours = [o["colour"] for o in reading.objects.values()]
    assert reading.background == "white" and "blue" in colours and "red" not in colours, reading

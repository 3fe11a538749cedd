"""The shipped rectified-flow shapes-world model (`assets/shapes-world-flow`): a stock diffusers
StableDiffusion3Pipeline folder without T5 that loads offline and generates what its caption says."""

from pathlib import Path

import pytest
import torch

import spdinv

FLOW_MODEL = Path(spdinv.__file__).resolve().parent / "assets" / "shapes-world-flow"

pytestmark = pytest.mark.skipif(not (FLOW_MODEL / "model_index.json").exists(), reason="flow model not built")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW_MODEL, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_folder_is_small_and_sd3_shaped(pipe):
    size = sum(f.stat().st_size for f in FLOW_MODEL.rglob("*") if f.is_file())
    assert size <= 40e6
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_a_two_step_generation_is_finite(pipe):
    images = pipe("a red circle on a white background", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_it_draws_the_caption_at_the_pipeline_defaults(pipe):
    """28 Euler steps, guidance 7.0 (SD3's defaults); the attribute classifier judges the image."""
    from spdinv.world.classifier import load_classifier, read_scenes

    images = pipe("a large red circle in the centre on a white background", generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    reading = read_scenes(load_classifier(), images * 2 - 1)[0]
    assert reading.background == "white"
    assert [(o["shape"], o["colour"]) for o in reading.objects.values()] == [("circle", "red")]

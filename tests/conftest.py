import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from spdinv.testing import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder, for the CLI."""
    from spdinv.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def red_circle(tmp_path_factory):
    """A rendered shapes-world scene saved as PNG (64x64)."""
    from spdinv.world.render import render
    from spdinv.world.scene import Scene, WorldObject

    path = tmp_path_factory.mktemp("images") / "red-circle.png"
    render(Scene((WorldObject("circle", "red", "centre"),), "white")).save(path)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

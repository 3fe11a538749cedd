"""The demo's model picker (spdinv.demo.models): the page offers the shipped models and `--model`,
each loaded on its first use and kept; picking one offers its family's inversions and engines; an
edit runs on the picked model (its files, inversion cache entries and notices its own); an unknown
or broken model, or an inversion the model's family does not run, is refused in one line."""

import argparse
import json
import threading

import pytest

from spdinv.demo.models import DemoModels
from spdinv.demo.session import DemoSession, EditRequest
from spdinv.editing.cache import InversionCache
from spdinv.errors import SpdinvError
from spdinv.families import SD, SD3

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"
FLOW_ONLY = {"rf_solver", "fireflow", "uni_inv", "flowedit"}


class Counted:
    """A loader that counts its calls (and can be made to fail)."""

    def __init__(self, load, error: Exception | None = None):
        self.load, self.error, self.calls = load, error, 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.load()


@pytest.fixture(scope="module")
def sd3():
    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_sd3_pipeline

    return from_pipeline(tiny_sd3_pipeline(), name="tiny-sd3")


@pytest.fixture
def picker(tiny, sd3, tmp_path, red_circle):
    loaders = {"tiny": Counted(lambda: tiny), "tiny-sd3": Counted(lambda: sd3),
               "broken": Counted(None, OSError("Unable to load weights from broken.safetensors\nsecond line"))}
    session = DemoSession(DemoModels(loaders, "tiny"), InversionCache(tmp_path / "cache"), [red_circle.parent],
                          workdir=tmp_path / "work")
    yield session, loaders
    session.close()


def _page_function(app, name: str):
    return next(block.fn for block in app.fns.values() if getattr(block.fn, "__name__", "") == name)


def test_models_load_on_first_use_once(picker):
    session, loaders = picker
    assert [loader.calls for loader in loaders.values()] == [0, 0, 0]  # nothing loaded before it is used
    assert session.offers().name == "tiny" and loaders["tiny"].calls == 1
    threads = [threading.Thread(target=session.model, args=("tiny-sd3",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.model("tiny-sd3") is session.model("tiny-sd3") and loaders["tiny-sd3"].calls == 1
    assert session.lock("tiny") is not session.lock("tiny-sd3")  # edits on two models do not wait for each other


def test_picking_a_model_offers_its_familys_choices(picker):
    """The picker's handler on the page: the flow model's inversions and engines replace the UNet's;
    a chosen name its family lacks falls back to the family's first, compare choices it lacks are dropped."""
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from spdinv.demo.app import build_app

    session, _ = picker
    app = build_app(session)
    picker_block = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert [c[0] for c in picker_block.choices] == ["tiny", "tiny-sd3", "broken"] and picker_block.value == "tiny"
    choose = _page_function(app, "choose")

    inversion, engine, also_inversions, also_engines, line = choose("tiny-sd3", "spdinv", "pnp", ["ddim"],
                                                                    ["pnp", "none"])
    assert FLOW_ONLY <= set(inversion["choices"]) and inversion["value"] == "spdinv"
    assert "rf_edit" in engine["choices"] and "pnp" not in engine["choices"] and engine["value"] == "p2p"
    assert also_inversions["value"] == ["ddim"] and also_engines["value"] == ["none"]
    assert "tiny-sd3" in line["value"] and SD3.name in line["value"]

    inversion, engine, also_inversions, *_ , line = choose("tiny", "uni_inv", "rf_edit", ["fireflow", "ddim"], [])
    assert not FLOW_ONLY & set(inversion["choices"]) and inversion["value"] == "ddim"  # the family's first
    assert "pnp" in engine["choices"] and "rf_edit" not in engine["choices"]
    assert also_inversions["value"] == ["ddim"] and SD.name in line["value"]


def test_an_unknown_or_broken_model_is_refused_in_one_line(picker, red_circle):
    import gradio

    from spdinv.demo.app import build_app

    session, loaders = picker
    with pytest.raises(SpdinvError, match=r"^unknown model 'nope'; the demo offers: tiny, tiny-sd3, broken$"):
        session.edit(EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["none"], steps=2, model="nope"))
    expected = "the model broken could not be loaded: Unable to load weights from broken.safetensors"
    with pytest.raises(SpdinvError) as refused:
        session.edit(EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["none"], steps=2, model="broken"))
    assert str(refused.value) == expected
    with pytest.raises(gradio.Error) as shown:  # the page: the same line, no traceback
        _page_function(build_app(session), "choose")("broken", "spdinv", "p2p", [], [])
    assert shown.value.message == expected and shown.value.print_exception is False
    assert loaders["broken"].calls == 2  # a failed load is tried again on the next use
    assert not list(session.workdir.glob("edit-*"))


@pytest.mark.parametrize("model, inversions, engines, message", [
    ("tiny", ["rf_solver"], ["none"], "inversion rf_solver does not run on the model tiny-0 (Stable Diffusion 1."),
    ("tiny", ["ddim"], ["rf_edit"], "engine rf_edit does not run on the model tiny-0"),
    ("tiny-sd3", ["spdinv"], ["pnp"], "engine pnp does not run on the model tiny-sd3 (Stable Diffusion 3"),
])
def test_a_choice_the_models_family_lacks_is_refused_in_one_line(picker, red_circle, model, inversions, engines,
                                                                 message):
    session, _ = picker
    with pytest.raises(SpdinvError) as refused:
        session.edit(EditRequest(red_circle, SOURCE, TARGET, inversions, engines, steps=2, model=model))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert not list(session.workdir.glob("edit-*"))  # refused before anything ran or was written


def test_an_edit_after_switching_runs_on_the_other_model(tiny, tmp_path, red_circle):
    """The CLI's picker (`spdinv demo` with --model given): the shipped flow model loads on its first
    use and edits with a flow engine; its files, cache entries and notices are its own."""
    from spdinv.commands.demo import demo_models

    args = argparse.Namespace(model="my-tiny", device="cpu", dtype="auto")
    models = demo_models(args, lambda given: tiny)
    assert models.names == ["shapes-world", "shapes-world-flow", "my-tiny"] and models.default == "my-tiny"
    assert models.offered["my-tiny"].model is tiny  # --model loads at start (a bad one is refused before serving)
    assert models.offered["shapes-world-flow"].model is None  # the others on their first use
    session = DemoSession(models, InversionCache(tmp_path / "cache"), [red_circle.parent], workdir=tmp_path / "work")
    try:
        def edited(model):
            return session.edit(EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["none"], steps=2, model=model))

        on_tiny, on_flow = edited(None), edited("shapes-world-flow")
        config = json.loads((on_flow.folder / "config.json").read_text())
        assert config["model"].endswith("shapes-world-flow") and config["family"] == SD3.name
        assert json.loads((on_tiny.folder / "config.json").read_text())["family"] == SD.name
        # the same image, prompt, method and steps: the tiny model's cache entry never serves the flow model
        assert [on_tiny.runs[0].cache, on_flow.runs[0].cache, edited("shapes-world-flow").runs[0].cache] == \
            ["cache miss", "cache miss", "cache hit"]
        assert on_tiny.image.size == (32, 32) and on_flow.image.size == (64, 64)  # each model's size
        assert "resized 64x64 to 32x32" in on_tiny.notices and "resized 64x64 to 32x32" not in on_flow.notices
        flow = session.edit(EditRequest(red_circle, SOURCE, TARGET, ["uni_inv"], ["rf_edit"], steps=2,
                                        model="shapes-world-flow"))
        assert [(run.method, run.engine) for run in flow.runs] == [("uni_inv", "rf_edit")]
    finally:
        session.close()

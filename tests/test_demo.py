"""The web demo's request handling without a browser (spdinv.demo.session needs no Gradio)."""

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from spdinv.demo.examples import EXAMPLES_DIR, load_examples
from spdinv.demo.session import (MAX_UPLOAD_PIXELS, DemoSession, EditRequest, blend_suggestions, parse_options,
                                 read_upload)
from spdinv.editing import edit
from spdinv.editing.cache import InversionCache
from spdinv.errors import SpdinvError
from spdinv.images import to_tensor
from spdinv.testing import same_up_to_rounding

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


@pytest.fixture
def session(tiny, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    demo = DemoSession(tiny, InversionCache(tmp_path / "cache"), [uploads, EXAMPLES_DIR], workdir=tmp_path / "work")
    yield demo
    demo.close()


def test_examples_cover_the_edit_kinds_and_are_not_world_renders():
    examples = load_examples()
    assert {e.kind for e in examples} >= {"colour", "shape", "background"}
    for example in examples:
        with Image.open(example.image) as image:
            assert image.size != (64, 64)  # drawn at another size: the demo resizes them as the CLI does
        assert example.source != example.target


def test_blend_suggestions_from_the_words_that_differ():
    assert blend_suggestions(SOURCE, TARGET) == ["red blue", "circle circle"]
    assert blend_suggestions("a cat", "a cat") == []
    assert blend_suggestions("a red circle", "a red square") == ["circle square"]


def test_blend_suggestions_leave_out_words_that_name_the_background():
    """'brown white' in '... on a brown background' -> '... on a white background' wrecked the edit
    (issue 27): words naming the background are not suggested, the object's words still are."""
    source = "a large green triangle in the centre on a brown background"
    assert blend_suggestions(source, source.replace("brown", "white")) == []
    assert blend_suggestions(source, source.replace("brown", "white grid")) == []
    assert blend_suggestions(source, source.replace("green", "red").replace("brown", "white")) == ["green red",
                                                                                                  "triangle triangle"]


def test_options_json():
    assert parse_options("") == {}
    assert parse_options('{"cross_replace": 0.7}') == {"cross_replace": 0.7}
    with pytest.raises(SpdinvError, match="not valid JSON"):
        parse_options("{cross_replace: 0.7")
    with pytest.raises(SpdinvError, match="JSON object"):
        parse_options("[1, 2]")


def test_uploads_are_read_only_from_the_allowed_folders(tmp_path, red_circle):
    with pytest.raises(SpdinvError, match="no image"):
        read_upload(None, [tmp_path], 32, 8)
    with pytest.raises(SpdinvError, match="reads no other path"):
        read_upload(red_circle, [tmp_path / "elsewhere"], 32, 8)
    with pytest.raises(SpdinvError, match="reads no other path"):
        read_upload(tmp_path / ".." / red_circle.parent.name / red_circle.name, [tmp_path], 32, 8)
    image, notices = read_upload(red_circle, [red_circle.parent], 32, 8)
    assert image.size == (32, 32) and notices == ["resized 64x64 to 32x32"]


def test_unreadable_and_oversized_uploads(tmp_path):
    garbage = tmp_path / "photo.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(SpdinvError, match="not a readable image"):
        read_upload(garbage, [tmp_path], 32, 8)
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, MAX_UPLOAD_PIXELS // 8000 + 1)).save(huge)  # a few kB on disk, too many pixels
    with pytest.raises(SpdinvError, match="megapixels"):
        read_upload(huge, [tmp_path], 32, 8)


@pytest.mark.parametrize("change, message", [
    (dict(source=""), "source prompt is empty"),
    (dict(target="   "), "target prompt is empty"),
    (dict(blend="square square"), "blend word 'square' is not in the source prompt"),
    (dict(engines=["masactrl"], blend="circle circle"), "blend words are a p2p"),
    (dict(inversions=["nope"]), "unknown inversion method"),
    (dict(options={"K": 3, "wobble": 1}), "wobble"),
    (dict(steps=0), "steps"),
])
def test_bad_requests_say_why(session, red_circle, change, message):
    (session.allowed[0] / "red.png").write_bytes(red_circle.read_bytes())
    request = dict(image=session.allowed[0] / "red.png", source=SOURCE, target=TARGET, inversions=["spdinv"],
                   engines=["p2p"], steps=3)
    with pytest.raises(SpdinvError, match=message):
        session.edit(EditRequest(**dict(request, **change)))


def test_compare_mode_writes_what_the_cli_writes_and_equals_edit(session, tiny, red_circle):
    path = session.allowed[0] / "red.png"
    path.write_bytes(red_circle.read_bytes())
    request = EditRequest(path, SOURCE, TARGET, ["ddim", "spdinv"], ["p2p", "none"], blend="circle circle", steps=3,
                          options={"K": 3})
    result = session.edit(request)
    assert [(r.method, r.engine) for r in result.runs] == [("ddim", "p2p"), ("ddim", "none"), ("spdinv", "p2p"),
                                                           ("spdinv", "none")]
    assert [r.cache for r in result.runs] == ["cache miss", "reused", "cache miss", "reused"]
    assert result.runs[0].mask is not None and result.runs[1].mask is None
    assert all(r.noise_error is not None and r.residuals is not None for r in result.runs)
    files = {p.name for p in result.folder.iterdir()}
    assert {"source.png", "grid.png", "config.json", "edit-spdinv-p2p.png", "mask-ddim-p2p.png",
            "reconstruction-spdinv-none.png"} <= files
    config = json.loads((result.folder / "config.json").read_text())
    assert config["steps"] == 3 and config["source"] == SOURCE and config["command"][0] == "spdinv demo"
    assert config["runs"][2]["inversion_options"] == {"K": 3}
    with zipfile.ZipFile(result.archive) as archive:
        assert "spdinv-edit/edit-ddim-none.png" in archive.namelist()

    # each run is what editing.edit() gives for that pair (the second engine reuses the inversion object)
    image = Image.open(path)
    direct = edit(tiny, image.resize((32, 32), Image.LANCZOS), SOURCE, TARGET, "spdinv", "none", num_steps=3, K=3)
    shown = to_tensor(result.runs[3].edited)
    assert same_up_to_rounding(shown, to_tensor(direct.pil()[0]), relative=1 / 127.5 + 1e-6)  # one 8-bit level

    again = session.edit(EditRequest(path, SOURCE, TARGET, ["spdinv"], ["none"], steps=3, options={"K": 3}))
    assert again.runs[0].cache == "cache hit"  # the same inversion cache the CLI uses
    assert np.array_equal(np.asarray(again.runs[0].edited), np.asarray(result.runs[3].edited))


def test_demo_command_refuses_an_unknown_model_in_one_line(capsys):
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from spdinv.cli import main

    assert main(["demo", "--model", "/no/such/model", "--no-cache"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("spdinv: error: ") and "/no/such/model" in error and "\n" not in error
    assert main(["demo", "--port", "70000"]) == 2


def test_the_inversion_cache_is_shared_with_the_cli(tiny_dir, red_circle, tmp_path):
    """`spdinv edit` inverts and stores; the demo, on the same model and image, finds it."""
    from spdinv.cli import main
    from spdinv.model import load_model

    cache = tmp_path / "cache"
    assert main(["edit", str(red_circle), "--source", SOURCE, "--target", TARGET, "--model", str(tiny_dir),
                 "--steps", "3", "--K", "3", "--cache", str(cache), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    demo = DemoSession(load_model(tiny_dir), InversionCache(cache), [red_circle.parent], workdir=tmp_path / "work")
    result = demo.edit(EditRequest(red_circle, SOURCE, TARGET, ["spdinv"], ["p2p"], steps=3, options={"K": 3}))
    assert result.runs[0].cache == "cache hit"
    assert result.runs[0].noise_error is None  # the CLI stores no diagnostics; the page says "not measured"
    demo.close()


def _dropdown_choices(app, elem_id: str) -> list[str]:
    found = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id]
    return [choice[0] if isinstance(choice, (tuple, list)) else choice for choice in found[0].choices]


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_the_page_offers_the_inversions_and_engines_of_the_models_family(family, tiny, tmp_path):
    """The flow-only methods (rf_solver, fireflow, uni_inv, flowedit) and rf_edit on flow transformers
    only, pnp on UNets only, the unconditional-row methods (null_text, negative_prompt) not on FLUX."""
    from spdinv.demo.app import build_app
    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    model = {"unet": lambda: tiny, "sd3": lambda: from_pipeline(tiny_sd3_pipeline()),
             "flux": lambda: from_pipeline(tiny_flux_pipeline())}[family]()
    demo = DemoSession(model, InversionCache(tmp_path / "cache"), [EXAMPLES_DIR], workdir=tmp_path / "work")
    try:
        app = build_app(demo)
        inversions, engines = _dropdown_choices(app, "inversion"), _dropdown_choices(app, "engine")
    finally:
        demo.close()
    flow_only = {"rf_solver", "fireflow", "uni_inv", "flowedit"}
    assert {"ddim", "spdinv", "direct", "aidi"} <= set(inversions)
    assert (flow_only <= set(inversions)) == (family != "unet")
    assert not (flow_only & set(inversions)) or family != "unet"
    assert ({"null_text", "negative_prompt"} <= set(inversions)) == (family != "flux")
    assert ("pnp" in engines) == (family == "unet") and ("rf_edit" in engines) == (family != "unet")
    assert {"p2p", "masactrl", "none"} <= set(engines)

"""The demo says what it did: the options box's guidance_scale is used (and said to override the
slider), and the page warns as the CLI does about words the model does not know, prompts past the
text encoder's window, and characters read as unknown."""

import numpy as np
import pytest

from spdinv.demo.session import DemoSession, EditRequest, request_notices
from spdinv.editing.cache import InversionCache

SOURCE = "a large red circle in the centre on a white background"
TARGET = "a large blue circle in the centre on a white background"


@pytest.fixture
def session(tiny, tmp_path, red_circle):
    demo = DemoSession(tiny, InversionCache(tmp_path / "cache"), [red_circle.parent], workdir=tmp_path / "work")
    yield demo
    demo.close()


def test_the_options_box_guidance_scale_is_used_and_said_so(session, red_circle):
    def edited(guidance, options):
        request = EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["none"], steps=2, guidance=guidance,
                              options=options)
        return session.edit(request)

    slider = edited(7.5, {})
    boxed = edited(7.5, {"guidance_scale": 2.0})
    same = edited(2.0, {})
    assert not np.array_equal(np.asarray(boxed.runs[0].edited), np.asarray(slider.runs[0].edited))
    assert np.array_equal(np.asarray(boxed.runs[0].edited), np.asarray(same.runs[0].edited))
    assert any("guidance_scale 2.0 from the options box is used, not the slider's 7.5" in n for n in boxed.notices)
    assert not any("guidance_scale" in n for n in slider.notices + same.notices)


def test_the_page_warns_about_prompts_as_the_cli_does(tiny, red_circle):
    from spdinv.model import load_model

    model = load_model()
    long = " ".join(["a large red circle"] * 30)
    request = EditRequest(red_circle, SOURCE + " 🔴", long + " zebra", ["ddim"], ["none"])
    notices = request_notices(model, request)
    assert any("source prompt" in n and "'🔴'" in n for n in notices)
    assert any("target prompt is" in n and "tokens" in n for n in notices)  # past the window
    assert any("does not know these target prompt words: zebra" in n for n in notices)
    assert request_notices(model, EditRequest(red_circle, SOURCE, TARGET, ["ddim"], ["none"])) == []

"""The web demo in a real browser: Debian's chromium, headless, driven by Playwright, against the
app served on a free loopback port; and its API endpoint through gradio_client.

The page test edits a hand-drawn picture (not a world render) on the embedded model and reads
the result with the attribute classifier; the API and concurrency tests use the tiny model."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client", reason="the demo extra is not installed: pip install -e '.[demo]'")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[demo]'")

from spdinv.demo.app import free_port, launch, readable_folders  # noqa: E402
from spdinv.demo.examples import load_examples  # noqa: E402
from spdinv.demo.session import DemoSession  # noqa: E402
from spdinv.editing.cache import InversionCache  # noqa: E402
from spdinv.model import EMBEDDED_MODEL  # noqa: E402

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EXAMPLE = next(e for e in load_examples() if e.kind == "colour")


def find_chromium() -> str | None:
    """$SPDINV_CHROMIUM, else a chromium on PATH (the set-up installs Debian's)."""
    given = os.environ.get("SPDINV_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium found (make setup installs it: apt-get install -y chromium; or set SPDINV_CHROMIUM)")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


def serve(models, cache_dir: Path | None):
    session = DemoSession(models, None if cache_dir is None else InversionCache(cache_dir), readable_folders())
    app, url = launch(session, port=free_port(), block=False)
    return session, app, url


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    if not (EMBEDDED_MODEL / "model_index.json").exists():
        pytest.skip("embedded model not built")
    from functools import partial

    from spdinv.demo.models import DemoModels
    from spdinv.model import NAMED_MODELS, load_model

    # what `spdinv demo` offers: the shipped models in the picker, the page opened on the embedded one
    models = DemoModels({name: partial(load_model, name) for name in NAMED_MODELS}, "shapes-world")
    session, app, url = serve(models, tmp_path_factory.mktemp("demo-cache"))
    yield url
    app.close()
    session.close()


@pytest.fixture(scope="module")
def tiny_session(tiny, tmp_path_factory):
    session, app, url = serve(tiny, tmp_path_factory.mktemp("demo-cache-tiny"))
    yield session, url
    app.close()
    session.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_session):
    return tiny_session[1]


def _textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def _image_of(page, elem_id: str) -> Image.Image:
    source = page.locator(f"#{elem_id} img").first.get_attribute("src")
    url = source if source.startswith("http") else page.url.rstrip("/") + "/" + source.lstrip("/")
    response = page.request.get(url)
    assert response.ok, response.status
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def test_page_edits_an_uploaded_drawing(browser, embedded_server, tmp_path):
    """Upload, prompts, the fast preset, Edit; the classifier reads the intended edit; the page
    asked nothing of any host but the server; an empty prompt gets the SpdinvError text."""
    from spdinv.images import to_tensor
    from spdinv.world.classifier import load_classifier, read_scenes

    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(embedded_server)
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE.image))
    page.get_by_text("resized 192x192 to 64x64").wait_for(timeout=20_000)
    _textbox(page, "source").fill(EXAMPLE.source)
    _textbox(page, "target").fill(EXAMPLE.target)
    page.locator("#suggested").get_by_text("circle circle").click()  # a suggested blend pair fills the blend box
    playwright.expect(_textbox(page, "blend")).to_have_value("circle circle")
    page.get_by_role("button", name="10 steps (fast)").click()
    page.get_by_text("advanced: each method's and engine's options").click()
    page.locator("#options .cm-content").click()
    page.keyboard.type('{"K": 5}')  # SPDInv's gradient steps per timestep: 5 keeps this test near 10 s
    start = time.perf_counter()
    page.locator("#edit-button").click()
    page.get_by_text("invert (spdinv)").first.wait_for(timeout=30_000)  # the live progress, from tqdm
    page.locator("#edited img").wait_for(timeout=120_000)
    seconds = time.perf_counter() - start
    page.locator("#summary").get_by_text("cache miss").wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    if os.environ.get("SPDINV_DEMO_SCREENSHOT"):  # how docs/demo.png is made (README)
        small = Image.open(tmp_path / "demo.png").convert("RGB")
        small = small.resize((small.width * 3 // 4, small.height * 3 // 4), Image.LANCZOS)
        small = small.quantize(128, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
        small.save(os.environ["SPDINV_DEMO_SCREENSHOT"], optimize=True)

    edited = _image_of(page, "edited")
    assert edited.size == (64, 64)
    reading = read_scenes(load_classifier(), to_tensor(edited))[0]
    assert [(o["shape"], o["colour"]) for o in reading.objects.values()] == [("circle", "blue")], reading
    assert reading.background == "white", reading
    assert page.locator("#mask img").count() == 1  # LocalBlend's mask is shown
    assert page.locator("#download a, #download [href]").count() >= 1

    shape = next(e for e in load_examples() if e.kind == "shape")
    page.get_by_text(f"shape: {shape.target}"[:40]).click()  # an example fills the image, prompts and engine
    playwright.expect(_textbox(page, "target")).to_have_value(shape.target)
    playwright.expect(_textbox(page, "engine")).to_have_value(shape.engine)

    _textbox(page, "source").fill("")
    page.locator("#edit-button").click()
    page.get_by_text("the source prompt is empty").first.wait_for(timeout=10_000)

    outside = [url for url in requested if urlparse(url).hostname not in ("127.0.0.1", "localhost")
               and not url.startswith(("data:", "blob:"))]
    assert outside == [], outside[:5]
    print(f"browser edit: {seconds:.1f} s")


def _edit(client, target: str, seed: int = 0):
    return client.submit(image=gradio_client.handle_file(str(EXAMPLE.image)), source=EXAMPLE.source, target=target,
                         inversion="spdinv", engine="p2p", blend="circle circle", steps=3, seed=seed,
                         options='{"K": 3}', api_name="/edit")


def _config(archive: str) -> dict:
    import json
    import zipfile

    with zipfile.ZipFile(archive) as opened:
        return json.loads(opened.read("spdinv-edit/config.json"))


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_api_endpoint_and_two_requests_at_once(tiny_session):
    """Two simultaneous requests both complete, each equal to what it gives alone: the model's lock
    keeps their attention processors from interleaving. The computations have the same shapes, so
    they agree exactly (not merely up to rounding); alone they reuse the cached inversions. The
    test holds the model's lock while both arrive, so they meet whatever the machine's load."""
    session, tiny_server = tiny_session
    client = gradio_client.Client(tiny_server, verbose=False)
    targets = (EXAMPLE.target, EXAMPLE.target.replace("blue", "green"))
    with session.lock():
        jobs = [_edit(client, t) for t in targets]
        time.sleep(2.0)
    together = [job.result(timeout=120) for job in jobs]
    alone = [_edit(client, t).result(timeout=120) for t in targets]
    for joint, single in zip(together, alone):
        edited, reconstruction, mask, residuals, gallery, summary, archive = joint
        assert Path(edited).is_file() and Path(archive).name == "spdinv-edit.zip"
        assert np.array_equal(_pixels(edited), _pixels(single[0]))
        assert "cache hit" in single[5]
    assert not np.array_equal(_pixels(together[0][0]), _pixels(together[1][0]))  # two different edits
    waits = [_config(joint[6])["timings"]["lock_wait"] for joint in together]
    assert max(waits) > 0.2, waits  # they did meet: one waited for the other's edit to finish

    # the README's call: positional image, source, target, inversion, engine, blend, steps; the edit first
    edited, *rest = client.predict(gradio_client.handle_file(str(EXAMPLE.image)), EXAMPLE.source, EXAMPLE.target,
                                   "ddim", "p2p", "circle circle", 3, api_name="/edit")
    assert Image.open(edited).size == (32, 32) and len(rest) == 6

    with pytest.raises(Exception, match="blend word 'square' is not in the source prompt"):
        client.predict(image=gradio_client.handle_file(str(EXAMPLE.image)), source=EXAMPLE.source,
                       target=EXAMPLE.target, blend="square square", api_name="/edit")


def test_a_full_queue_says_so(tiny):
    """Past the queue's bound a request is refused at once with Gradio's "Queue is full" (no hang)."""
    session = DemoSession(tiny, None, readable_folders())
    app, url = launch(session, port=free_port(), block=False, queue_size=1)
    try:
        client = gradio_client.Client(url, verbose=False)
        jobs = [_edit(client, EXAMPLE.target) for _ in range(5)]
        outcomes = []
        for job in jobs:
            try:
                job.result(timeout=120)
                outcomes.append("done")
            except Exception as error:  # noqa: BLE001 - gradio_client's QueueError, whatever its module
                outcomes.append(str(error))
    finally:
        app.close()
        session.close()
    assert "done" in outcomes
    assert any("Queue is full" in outcome for outcome in outcomes), outcomes


def test_a_server_path_in_a_request_is_not_read(tiny_server):
    """A request naming a file on the server instead of uploading it gets an error, not the file."""
    import httpx

    inputs = [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, EXAMPLE.source, EXAMPLE.target,
              "ddim", "none", "", 3, 7.5, 0, "", [], []]
    event = httpx.post(tiny_server + "gradio_api/call/edit", json={"data": inputs}, timeout=30).json()["event_id"]
    with httpx.stream("GET", f"{tiny_server}gradio_api/call/edit/{event}", timeout=60) as stream:
        answer = "".join(stream.iter_text())
    assert "event: error" in answer and "complete" not in answer, answer


@pytest.fixture(scope="module")
def two_models_server(tiny, tmp_path_factory):
    """The tiny UNet model and a tiny SD3 (rectified-flow MMDiT) in the picker, the UNet first."""
    from spdinv.demo.models import DemoModels
    from spdinv.model import from_pipeline
    from spdinv.testing import tiny_sd3_pipeline

    models = DemoModels({"tiny": lambda: tiny, "tiny-sd3": lambda: from_pipeline(tiny_sd3_pipeline(), "tiny-sd3")},
                        "tiny")
    session = DemoSession(models, InversionCache(tmp_path_factory.mktemp("demo-cache-two")), readable_folders())
    app, url = launch(session, port=free_port(), block=False)
    yield url
    app.close()
    session.close()


def _offered(page, elem_id: str) -> list[str]:
    """The options a dropdown lists once opened."""
    page.locator(f"#{elem_id} input").click()
    options = page.locator(f"#{elem_id} li[role=option]")
    options.first.wait_for(timeout=10_000)
    found = [option.get_attribute("aria-label") for option in options.all()]
    page.keyboard.press("Escape")
    return found


def test_the_model_picker_switches_the_choices_and_the_edit(browser, two_models_server, tmp_path):
    """Picking the flow model in the page lists its family's inversions and engines (rf_edit and the
    flow inversions, no pnp), names it, and the page's Edit runs on it; through the API an edit names
    its model, and one with an engine the model's family lacks or an unknown model is refused."""
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(two_models_server)
    page.locator("#model-line").get_by_text("Stable Diffusion 1.x/2.x").wait_for(timeout=20_000)
    engines = _offered(page, "engine")
    assert "pnp" in engines and "rf_edit" not in engines, engines
    page.locator("#model input").click()
    page.locator("#model li[role=option][aria-label='tiny-sd3']").click()
    page.locator("#model-line").get_by_text("Stable Diffusion 3").wait_for(timeout=30_000)
    engines, inversions = _offered(page, "engine"), _offered(page, "inversion")
    assert "rf_edit" in engines and "pnp" not in engines, engines
    assert {"rf_solver", "fireflow", "uni_inv", "flowedit"} <= set(inversions), inversions
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE.image))  # the page's Edit: on tiny-sd3
    _textbox(page, "source").fill(EXAMPLE.source)
    _textbox(page, "target").fill(EXAMPLE.target)
    page.get_by_role("button", name="10 steps (fast)").click()
    page.locator("#edit-button").click()
    page.locator("#download a").first.wait_for(timeout=120_000)
    link = page.locator("#download a").first.get_attribute("href")
    response = page.request.get(link if link.startswith("http") else page.url.rstrip("/") + "/" + link.lstrip("/"))
    archive = tmp_path / "picked.zip"
    archive.write_bytes(response.body())
    assert _config(str(archive))["model"] == "tiny-sd3"

    client = gradio_client.Client(two_models_server, verbose=False)
    archive = client.predict(image=gradio_client.handle_file(str(EXAMPLE.image)), source=EXAMPLE.source,
                             target=EXAMPLE.target, inversion="ddim", engine="rf_edit", steps=2, model="tiny-sd3",
                             api_name="/edit")[6]
    assert _config(archive)["family"].startswith("Stable Diffusion 3") and _config(archive)["model"] == "tiny-sd3"
    with pytest.raises(Exception, match="engine pnp does not run on the model tiny-sd3"):
        client.predict(image=gradio_client.handle_file(str(EXAMPLE.image)), source=EXAMPLE.source,
                       target=EXAMPLE.target, engine="pnp", steps=2, model="tiny-sd3", api_name="/edit")
    with pytest.raises(Exception, match="unknown model 'nope'"):
        client.predict(image=gradio_client.handle_file(str(EXAMPLE.image)), source=EXAMPLE.source,
                       target=EXAMPLE.target, steps=2, model="nope", api_name="/edit")

"""The web demo's page: a Gradio Blocks app with a model picker (spdinv.demo.session does the work).

Offline by design: analytics off, no server-side rendering, every asset served by the app
itself (the browser test checks that the page makes no request off the loopback host)."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

import gradio as gr  # noqa: E402

from ..errors import SpdinvError  # noqa: E402
from .examples import EXAMPLES_DIR, load_examples  # noqa: E402
from .session import (MAX_PROMPT_CHARS, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, DemoSession, EditRequest,  # noqa: E402
                      ModelChoices, blend_suggestions, parse_options, read_upload)

QUEUE_SIZE = 8  # requests waiting at once; one more is refused with "queue is full"
CONCURRENCY = 2  # requests past the queue at once: one edits (the model's lock), one can be checked meanwhile
STEP_PRESETS = (10, 20)
# Results are small (64 px on the embedded model): shown filling their boxes, pixels kept sharp.
CSS = """#edited img, #reconstruction img, #mask img {
  width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"""


def _path(payload) -> str | None:
    """The server-side path of an image payload (the event runs without Gradio's preprocessing, so
    that an unreadable upload gets spdinv's one-line message)."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None) or str(payload)


def _choices(chosen: str, also: list[str] | None) -> list[str]:
    """The picked name first, then the compare mode's extra ones."""
    return list(dict.fromkeys([chosen, *(also or [])]))


def readable_folders() -> list:
    """The only folders the demo reads images from: Gradio's upload folder and the shipped examples."""
    from pathlib import Path

    return [Path(gr.utils.get_upload_folder()), EXAMPLES_DIR]


def _options_help() -> str:
    from ..editing import ENGINES
    from ..editing.sampler import SamplerOptions
    from ..inversion import METHODS
    from ..presets import PRESETS

    def fields(cls) -> str:
        return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING) or "none"

    lines = [f"- **{name}** (inversion): {fields(m.options)}" for name, m in METHODS.items()]
    lines += [f"- **{name}** (engine): {fields(e.options)}" for name, e in ENGINES.items()]
    lines.append(f"- **sampler**: {fields(SamplerOptions)}")
    lines.append(f"- **preset**: {', '.join(PRESETS)}, e.g. {{\"preset\": \"spdinv-official\"}}: a published "
                 "script's settings, under the options given (README, docs/fidelity.md)")
    return "\n".join(lines)


def _summary(result) -> str:
    rows = ["| inversion | engine | reconstruction PSNR | noise error | invert s | edit s | inversion cache |",
            "|---|---|---|---|---|---|---|"]
    for run in result.runs:
        invert = f"{run.timings['invert']:.1f}" if "invert" in run.timings else "(reused)"
        noise = "not measured" if run.noise_error is None else f"{run.noise_error:.3g}"
        rows.append(f"| {run.method} | {run.engine} | {run.psnr:.2f} dB | {noise} | {invert} "
                    f"| {run.timings['edit']:.1f} | {run.cache} |")
    notes = "".join(f"\n\nnote: {n}" for n in result.notices)
    return "\n".join(rows) + notes


@dataclass
class Inputs:
    model: gr.Dropdown
    image: gr.Image
    converted: gr.Markdown
    source: gr.Textbox
    target: gr.Textbox
    blend: gr.Textbox
    suggested: gr.Radio
    inversion: gr.Dropdown
    engine: gr.Dropdown
    steps: gr.Slider
    presets: list[gr.Button]
    guidance: gr.Slider
    compare_inversions: gr.CheckboxGroup
    compare_engines: gr.CheckboxGroup
    options: gr.Code
    seed: gr.Number
    run: gr.Button

    def of_edit(self) -> list:
        """The API endpoint's parameters, in order."""
        return [self.image, self.source, self.target, self.inversion, self.engine, self.blend, self.steps,
                self.guidance, self.seed, self.options, self.compare_inversions, self.compare_engines, self.model]

    def of_family(self) -> list:
        """What the model picker sets: the inversion and engine choices."""
        return [self.inversion, self.engine, self.compare_inversions, self.compare_engines]


def _inputs(seed: int, offered: ModelChoices, names: list[str]) -> Inputs:
    inversions, engines = list(offered.inversions), list(offered.engines)
    model = gr.Dropdown(names, value=offered.name, label="model (its family's inversions and engines below)",
                        elem_id="model")
    image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"], format="png", elem_id="image",
                     height=256)
    converted = gr.Markdown(elem_id="converted")
    source = gr.Textbox(label="source prompt (describes the image)", max_length=MAX_PROMPT_CHARS, elem_id="source")
    target = gr.Textbox(label="target prompt (describes the edit)", max_length=MAX_PROMPT_CHARS, elem_id="target")
    blend = gr.Textbox(value="", label="blend words (p2p LocalBlend): 'SOURCE_WORD TARGET_WORD', or empty",
                       elem_id="blend")
    suggested = gr.Radio(label="suggested from the words that differ", choices=[], visible=False, elem_id="suggested")
    with gr.Row():
        inversion = gr.Dropdown(inversions, value=_kept("spdinv", inversions), label="inversion", elem_id="inversion")
        engine = gr.Dropdown(engines, value=engines[0], label="engine", elem_id="engine")
    with gr.Row():
        steps = gr.Slider(1, 100, value=20, step=1, label="steps", elem_id="steps")
        presets = [gr.Button(f"{n} steps" + (" (fast)" if n == 10 else ""), size="sm") for n in STEP_PRESETS]
    guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="target guidance scale")
    with gr.Accordion("compare: several inversions x engines side by side", open=False):
        compare_inversions = gr.CheckboxGroup(inversions, label="also invert with")
        compare_engines = gr.CheckboxGroup(engines, label="also edit with")
    with gr.Accordion("advanced: each method's and engine's options", open=False):
        options = gr.Code(language="json", label='options as JSON, e.g. {"cross_replace": 0.7, "K": 10}', value="",
                          elem_id="options")
        gr.Markdown(_options_help())
        seed = gr.Number(seed, precision=0, label="seed", minimum=0)
    run = gr.Button("Edit", variant="primary", elem_id="edit-button")
    return Inputs(model, image, converted, source, target, blend, suggested, inversion, engine, steps, presets,
                  guidance, compare_inversions, compare_engines, options, seed, run)


def _outputs() -> list:
    """The endpoint's results, the edited image first."""
    edited = gr.Image(label="edit", format="png", interactive=False, elem_id="edited", height=256)
    with gr.Row():
        reconstruction = gr.Image(label="reconstruction", format="png", interactive=False, elem_id="reconstruction",
                                  height=160)
        mask = gr.Image(label="LocalBlend mask", format="png", interactive=False, elem_id="mask", height=160)
    summary = gr.Markdown(label="summary", elem_id="summary")
    residuals = gr.Image(label="inversion residual per step", format="png", interactive=False)
    compared = gr.Gallery(label="all inversion x engine results (compare)", columns=4, format="png", preview=False,
                          object_fit="contain", elem_id="compared", visible=False)
    download = gr.File(label="download: the files `spdinv edit --out` writes", elem_id="download")
    return [edited, reconstruction, mask, residuals, compared, summary, download]


def build_app(session: DemoSession) -> gr.Blocks:
    """The page and its API endpoint `edit`."""
    from ..commands.edit import _mask_image

    def edit(image, source: str, target: str, inversion: str = "spdinv", engine: str = "p2p", blend: str = "",
             steps: int = 20, guidance: float = 7.5, seed: int = 0, options: str = "",
             compare_inversions: list[str] | None = None, compare_engines: list[str] | None = None,
             model: str | None = None, progress=gr.Progress(track_tqdm=True)):
        try:
            request = EditRequest(image=_path(image) or "", source=source or "", target=target or "",
                                  inversions=_choices(inversion, compare_inversions),
                                  engines=_choices(engine, compare_engines), blend=blend or "",
                                  steps=_number(steps, "steps", integer=True), guidance=_number(guidance, "guidance"),
                                  seed=_seed(seed), options=parse_options(options), model=model or None)
            request.preset = request.options.pop("preset", None)
            result = session.edit(request, progress=True)
        except SpdinvError as error:
            raise gr.Error(str(error), print_exception=False) from None
        first, size = result.runs[0], result.image.size
        gallery = [(r.edited, f"{r.method} + {r.engine}") for r in result.runs]
        return (first.edited, first.reconstruction, None if first.mask is None else _mask_image(first.mask, size),
                None if first.residuals is None else str(first.residuals),
                gr.Gallery(value=gallery, visible=len(gallery) > 1), _summary(result), str(result.archive))

    offered = session.offers()
    examples = [e for e in load_examples() if e.engine in offered.engines]
    with gr.Blocks(title="spdinv demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## spdinv: text-driven editing of real images")
        line = gr.Markdown(_model_line(offered), elem_id="model-line")
        with gr.Row():
            with gr.Column():
                given = _inputs(session.seed, offered, session.models.names)
            with gr.Column():
                results = _outputs()
        if examples:
            gr.Examples([[str(e.image), e.source, e.target, e.engine, e.blend] for e in examples],
                        inputs=[given.image, given.source, given.target, given.engine, given.blend],
                        label="examples (hand-drawn; one per edit kind)",
                        example_labels=[f"{e.kind}: {e.target}" for e in examples])
        _listen(session, given, line)
        given.run.click(edit, given.of_edit(), results, api_name="edit", preprocess=False,
                        concurrency_limit=CONCURRENCY)
    return app


def _listen(session: DemoSession, given: Inputs, line: gr.Markdown) -> None:
    """The page's own events: the model picker, the upload note, blend suggestions, step presets."""
    def choose(name: str, inversion: str, engine: str, also_inversions: list[str] | None,
               also_engines: list[str] | None):
        """The picked model's family's choices (the model loads on its first use)."""
        try:
            offered = session.offers(name)
        except SpdinvError as error:
            raise gr.Error(str(error), print_exception=False) from None
        inversions, engines = list(offered.inversions), list(offered.engines)
        return (gr.update(choices=inversions, value=_kept(inversion, inversions)),
                gr.update(choices=engines, value=_kept(engine, engines)),
                gr.update(choices=inversions, value=[n for n in also_inversions or [] if n in inversions]),
                gr.update(choices=engines, value=[n for n in also_engines or [] if n in engines]),
                gr.update(value=_model_line(offered)))

    def inspect(image, name: str):
        """On upload or another model: how the upload is converted for the model (or why it cannot be)."""
        if _path(image) is None:
            return gr.update(value="")
        try:
            model = session.model(name)
            _, notices = read_upload(_path(image), session.allowed, model.image_size, model.size_multiple)
        except SpdinvError as error:
            raise gr.Error(str(error), print_exception=False) from None
        return gr.update(value="; ".join(notices) or "used as it is")

    def suggest(source: str, target: str):
        found = blend_suggestions(source or "", target or "")
        return gr.update(choices=found, value=None, visible=bool(found))

    given.model.change(choose, [given.model, *given.of_family()], [*given.of_family(), line], api_name=False)
    for trigger in (given.image, given.model):
        trigger.change(inspect, [given.image, given.model], given.converted, preprocess=False, api_name=False)
    for box in (given.source, given.target):
        box.change(suggest, [given.source, given.target], given.suggested, api_name=False)
    given.suggested.input(lambda words: words or "", given.suggested, given.blend, api_name=False)
    for button, n in zip(given.presets, STEP_PRESETS):
        button.click(lambda n=n: n, None, given.steps, api_name=False)


def _kept(value: str, choices: list[str]) -> str:
    """The chosen name if the model's family has it, else the family's first."""
    return value if value in choices else choices[0]


def _model_line(offered: ModelChoices) -> str:
    return (f"Model: `{offered.folder}` ({offered.family}). Uploads: any format PIL reads, at most "
            f"{MAX_UPLOAD_BYTES // 2**20} MB and {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels; resized at their own "
            f"aspect ratio to about {offered.image_size}x{offered.image_size} px as `spdinv edit` does.")


def _number(value, what: str, integer: bool = False) -> float | int:
    """A number from the page or the API (sliders send floats); range checks are the library's."""
    kind = "an integer" if integer else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpdinvError(f"{what} must be {kind}, got {value!r}") from None
    if not integer:
        return number
    if not number.is_integer():
        raise SpdinvError(f"{what} must be {kind}, got {value!r}")
    return int(number)


def _seed(value) -> int:
    from ..arguments import MAX_SEED

    seed = _number(value, "seed", integer=True)
    if not 0 <= seed <= MAX_SEED:
        raise SpdinvError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return seed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(session: DemoSession, host: str = "127.0.0.1", port: int = 7860, *, queue_size: int = QUEUE_SIZE,
           block: bool = True) -> tuple[gr.Blocks, str]:
    """Serve the app; (app, local URL). With block=False it returns once the server is up."""
    app = build_app(session)
    app.queue(max_size=queue_size, default_concurrency_limit=CONCURRENCY)
    allowed = [str(EXAMPLES_DIR), str(session.workdir)]
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           share=False, show_error=False, css=CSS, max_file_size=MAX_UPLOAD_BYTES,
                           allowed_paths=allowed,
                           ssr_mode=False, enable_monitoring=False, mcp_server=False, footer_links=["api"],
                           theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                                   font_mono=["ui-monospace", "monospace"]))
    return app, url


__all__ = ["build_app", "free_port", "launch", "readable_folders", "QUEUE_SIZE", "CONCURRENCY"]

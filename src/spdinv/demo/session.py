"""What the web demo does with a request, without Gradio: check the inputs, run
`spdinv.editing.edit()` for each chosen inversion x engine under the model's lock, and write the
files `spdinv edit --out` writes (plus the residual plot) into a folder and a zip to download."""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import SpdinvError, require_finite
from ..editing.tokens import names_background
from ..images import Framing, fit_image, open_image, psnr, to_tensor
from ..model import DiffusionModel
from .models import DemoModels, short_name

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # the upload limit the server enforces (Gradio's max_file_size)
MAX_UPLOAD_PIXELS = 40_000_000  # decoded size: larger images are refused before they are decoded
MAX_PROMPT_CHARS = 1000
MAX_OPTIONS_CHARS = 4000
MAX_STEPS = 200
MAX_RUNS = 12  # compare mode: at most this many inversion x engine pairs in one request


@dataclass
class EditRequest:
    """One request from the page or the API. `options` go to edit() (engine, sampler, inversion)."""

    image: str | Path
    source: str
    target: str
    inversions: list[str]
    engines: list[str]
    blend: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    options: dict = field(default_factory=dict)
    preset: str | None = None  # spdinv.presets: a published script's settings, under `options`
    model: str | None = None  # a name the picker offers (DemoModels); None: the one the demo opened on


@dataclass(frozen=True)
class Pair:
    """One inversion x engine of a request, with its options routed and checked."""

    method: str
    engine: str
    options: dict  # what edit() takes
    engine_options: object  # the engine's options dataclass
    method_options: dict


@dataclass
class DemoRun:
    """One inversion x engine result."""

    method: str
    engine: str
    edited: Image.Image
    reconstruction: Image.Image
    mask: object | None  # LocalBlend's (1, 1, h, w) tensor at latent size
    psnr: float
    cache: str
    timings: dict
    noise_error: float | None = None  # mean final fixed-point residual (the paper's D_Noi)
    residuals: Path | None = None


@dataclass(frozen=True)
class ModelChoices:
    """A picker entry's model as the page describes it, with the choices its family has."""

    name: str  # the picker's name
    folder: str  # the model's folder or hub name
    family: str
    inversions: tuple[str, ...]
    engines: tuple[str, ...]
    image_size: int


@dataclass
class DemoResult:
    image: Image.Image
    runs: list[DemoRun]
    folder: Path
    archive: Path
    notices: list[str]


def parse_options(text: str) -> dict:
    """The advanced panel's JSON object of options ({} when blank)."""
    if not text or not text.strip():
        return {}
    if len(text) > MAX_OPTIONS_CHARS:
        raise SpdinvError(f"options are {len(text)} characters; at most {MAX_OPTIONS_CHARS}")
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise SpdinvError(f"options are not valid JSON: {error.msg} ({where})") from None
    if not isinstance(options, dict):
        raise SpdinvError('options must be a JSON object, e.g. {"cross_replace": 0.7}')
    return options


def blend_suggestions(source: str, target: str) -> list[str]:
    """LocalBlend word pairs from the words that differ: each replaced word pair ('red blue') and
    the word both prompts share after it ('circle circle'), the object a colour or material
    word describes. Words that name the background ('brown white' in '... on a brown background')
    are not suggested: a background edit's region is the whole background, which LocalBlend
    cannot cut better than no blend at all (measured in docs/results.md, "Blend words that name
    the background")."""
    a, b = source.lower().split(), target.lower().split()
    found: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "replace" or names_background(source, a[i1]) or names_background(target, b[j1]):
            continue
        found.append(f"{a[i1]} {b[j1]}")
        if i2 < len(a) and j2 < len(b) and a[i2] == b[j2]:
            found.append(f"{a[i2]} {b[j2]}")
    return list(dict.fromkeys(found))


def read_upload(path: str | Path | None, allowed: list[Path], size: int, multiple: int) -> tuple[Image.Image, list[str]]:
    """The uploaded file as the CLI reads it (decoded, converted to RGB, fitted at its own aspect
    ratio to about `size`^2 pixels, sides multiples of `multiple`: `images.fit_image`), with notices. Only files under `allowed` folders (Gradio's upload folder, the shipped
    examples) are read: never a path a request names elsewhere on the server."""
    if path is None or str(path) == "":
        raise SpdinvError("no image: upload one or pick an example")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(folder.resolve()) for folder in allowed):
        raise SpdinvError("the image must be uploaded; the server reads no other path")
    if resolved.is_file() and resolved.stat().st_size > MAX_UPLOAD_BYTES:
        megabytes = resolved.stat().st_size / 2**20
        raise SpdinvError(f"the upload is {megabytes:.1f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB")
    _check_pixels(resolved)
    image, notices = open_image(resolved)
    fitted, more = fit_image(image, size, multiple)
    return fitted, notices + more


def _check_pixels(path: Path) -> None:
    try:
        with Image.open(path) as header:  # reads the header only
            width, height = header.size
    except Exception:  # noqa: BLE001 - open_image gives the one-line reason
        return
    if width * height > MAX_UPLOAD_PIXELS:
        raise SpdinvError(f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
                          f"at most {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels")


def check_request(request: EditRequest) -> None:
    from ..editing import check_pairs
    from ..inversion import check_prompt

    for text, what in ((request.source, "source prompt"), (request.target, "target prompt")):
        check_prompt(text or "", what)
        if len(text) > MAX_PROMPT_CHARS:
            raise SpdinvError(f"the {what} is {len(text)} characters; at most {MAX_PROMPT_CHARS}")
    check_pairs(request.inversions, request.engines, "choose at least one inversion and one engine")
    if len(request.inversions) * len(request.engines) > MAX_RUNS:
        raise SpdinvError(f"compare at most {MAX_RUNS} inversion x engine pairs at once")
    if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
        raise SpdinvError(f"steps must be an integer in [1, {MAX_STEPS}], got {request.steps}")
    if request.blend.strip() and "p2p" not in request.engines:
        raise SpdinvError("blend words are a p2p (Prompt-to-Prompt) option; the engine is "
                          + ", ".join(request.engines))


@dataclass
class DemoSession:
    """The models the page offers (each with its lock: attention processors live on its network, so
    edits on one model never interleave), the inversion cache shared with the CLI (its keys name the
    model's weights, so an entry of one model never serves another), and where results go. A single
    model is offered alone."""

    models: DemoModels | DiffusionModel
    cache: object | None  # spdinv.editing.cache.InversionCache
    allowed: list[Path]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spdinv-demo-")))
    keep: int = 32  # results of this many recent requests stay on disk (Gradio serves copies of them)
    seed: int = 0  # the page's default seed (`spdinv demo --seed`)
    folders: threading.Lock = field(default_factory=threading.Lock)  # making and pruning result folders

    def __post_init__(self) -> None:
        if isinstance(self.models, DiffusionModel):
            self.models = DemoModels.of(self.models)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def model(self, name: str | None = None) -> DiffusionModel:
        """The offered model of that name (None: the default), loaded on first use."""
        return self.models.get(name)

    def lock(self, name: str | None = None) -> threading.Lock:
        """The lock each edit on that model holds."""
        return self.models.entry(name).lock

    def offers(self, name: str | None = None) -> ModelChoices:
        """What the page offers on that model: its family's inversions and engines."""
        from ..editing import family_choices

        model = self.model(name)
        choices = family_choices(model.family)
        return ModelChoices(self.models.entry(name).name, short_name(model), model.family.name, choices.inversions,
                            choices.engines, model.image_size)

    def edit(self, request: EditRequest, *, progress: bool = False) -> DemoResult:
        """Check everything, then run each inversion x engine through editing.edit() holding the model's lock."""
        check_request(request)
        model = self.model(request.model)
        check_family(model, request)
        image, notices = read_upload(request.image, self.allowed, model.image_size, model.size_multiple)
        notices = notices + request_notices(model, request)
        pairs = request_pairs(request)
        start = time.perf_counter()
        with self.lock(request.model):
            waited = time.perf_counter() - start
            here = self._new_folder()
            runs = self._run_all(model, image, request, pairs, progress, here)
        folder = self._write(model, image, request, runs, pairs, {"lock_wait": waited}, here / "spdinv-edit")
        return DemoResult(image, runs, folder, _zip(folder), notices)

    def _new_folder(self) -> Path:
        """A folder for this request's files; the oldest beyond `keep` are removed."""
        with self.folders:
            previous = sorted(self.workdir.glob("edit-*"), key=lambda p: p.stat().st_mtime)
            for old in previous[: max(0, len(previous) - self.keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
            return Path(tempfile.mkdtemp(prefix="edit-", dir=self.workdir))

    def _run_all(self, model: DiffusionModel, image: Image.Image, request: EditRequest, pairs: list[Pair],
                 progress: bool, folder: Path) -> list[DemoRun]:
        """Every pair through the library's `edits()` (one inversion per method, shared by its engines;
        every engine's words checked before anything is inverted), in the pairs' order."""
        from ..editing import edits

        sampler = {k: v for k, v in pairs[0].options.items() if k in _sampler_fields()}  # the same for every pair
        results = edits(model, image, request.source, request.target, list(request.inversions),
                        list(request.engines), num_steps=request.steps, seed=request.seed, progress=progress,
                        cache=self.cache, diagnose=True, preset=request.preset, framing=Framing(size=image.size),
                        inversion_options={pair.method: pair.method_options for pair in pairs},
                        engine_options={pair.engine: pair.engine_options for pair in pairs}, sampler=sampler)
        by_pair = {(result.inversion.settings.get("method", result.inversion.method), result.engine): result
                   for result in results}
        runs, seen, plots = [], set(), {}
        source_tensor = to_tensor(image)
        cached = {None: "not cached", True: "cache hit", False: "cache miss"}
        for pair in pairs:
            result = by_pair[pair.method, pair.engine]
            require_finite(result.edited, f"the {pair.method} + {pair.engine} result")
            reused = id(result.inversion) in seen  # compare mode: another engine's inversion
            if not reused:
                seen.add(id(result.inversion))
                plots[pair.method] = self._plot(result.inversion, request.source,
                                                folder / f"residuals-{pair.method}.png")
            edited, reconstruction = result.pil()
            timings = {k: v for k, v in result.timings.items() if not (reused and k == "invert")}
            runs.append(DemoRun(pair.method, pair.engine, edited, reconstruction, result.mask,
                                psnr(result.reconstruction, source_tensor), "reused" if reused else cached[result.cache_hit],
                                timings, result.inversion.noise_error, plots[pair.method]))
        return runs

    def _plot(self, inversion, prompt: str, path: Path) -> Path | None:
        from ..plots import plot_residuals

        measured = [s for s in inversion.steps if s.residual_after == s.residual_after]  # NaN: not measured
        if not measured:
            return None
        plot_residuals(inversion.steps, path, title=f"{inversion.method}: {prompt}")
        return path

    def _write(self, model: DiffusionModel, image: Image.Image, request: EditRequest, runs: list[DemoRun],
               pairs: list[Pair], timings: dict, out: Path) -> Path:
        """The folder `spdinv edit --out` writes (source, edit, reconstruction, mask, grid, config.json)."""
        from ..editing import preset_options
        from ..commands.edit import EditOutputs, Run, write_outputs

        per_method = {pair.method: pair.method_options for pair in pairs}
        per_engine = {pair.engine: pair.engine_options for pair in pairs}
        samplers = [preset_options(request.preset, pair.engine, {},
                                   {k: v for k, v in pair.options.items() if k in _sampler_fields()})[1] for pair in pairs]
        written = [Run(r.method, r.engine, r.edited, r.reconstruction, r.mask, r.psnr, r.cache, r.timings,
                       sampler=dataclasses.asdict(sampler)) for r, sampler in zip(runs, samplers)]
        outputs = EditOutputs(out, Path(request.image).name, request.seed, request.steps, request.preset,
                              command=["spdinv demo", *_request_summary(request)])
        write_outputs(outputs, model, image, request.source.strip(), request.target.strip(), samplers[0],
                      per_method, per_engine, written, timings)
        return out

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def check_family(model: DiffusionModel, request: EditRequest) -> None:
    """Every chosen inversion and engine runs on the model's family (the page offers only those;
    the API may ask for others): refused in one line, before anything is read or run."""
    from ..editing import family_choices
    from ..inversion import get_method

    for name in request.inversions:
        get_method(name)  # an unknown name is refused as unknown (check_request checked the engines')
    choices = family_choices(model.family)
    for kind, chosen, offered in (("inversion", request.inversions, choices.inversions),
                                  ("engine", request.engines, choices.engines)):
        for name in chosen:
            if name not in offered:
                raise SpdinvError(f"{kind} {name} does not run on the model {short_name(model)} ({model.family.name}); "
                                  f"its {kind}s: {', '.join(offered)}")


def request_pairs(request: EditRequest) -> list[Pair]:
    """Each inversion x engine of the request with its options routed (engine, sampler, inversion)
    and the preset's settings under them."""
    from ..editing import preset_options, split_fields
    from ..presets import inversion_settings

    pairs = []
    for method in request.inversions:
        for engine in request.engines:
            options = {"guidance_scale": request.guidance, **_applicable(request, method, engine)}
            if engine == "p2p" and request.blend.strip():
                options["blend"] = request.blend.strip()
            engine_fields, sampler_fields, method_fields = split_fields(engine, method, options)
            engine_options, _ = preset_options(request.preset, engine, engine_fields, sampler_fields)
            method_options = {**inversion_settings(request.preset, method), **method_fields}
            pairs.append(Pair(method, engine, options, engine_options, method_options))
    return pairs


def _applicable(request: EditRequest, method: str, engine: str) -> dict:
    """The options that apply to this inversion x engine pair; in compare mode each pair takes
    those it has (as `spdinv edit --inversion all` does), and an option no chosen method, engine
    or the sampler has is an error."""
    from ..editing import get_engine
    from ..inversion import get_method

    def names(*classes) -> set[str]:
        return {f.name for cls in classes for f in dataclasses.fields(cls)}

    everything = names(*(get_method(m).options for m in request.inversions),
                       *(get_engine(e).options for e in request.engines)) | _sampler_fields()
    unknown = sorted(set(request.options) - everything)
    if unknown:
        raise SpdinvError(f"option(s) {', '.join(unknown)} apply to none of inversion {', '.join(request.inversions)}, "
                          f"engine {', '.join(request.engines)} or the sampler; valid: {', '.join(sorted(everything))}")
    mine = names(get_method(method).options, get_engine(engine).options) | _sampler_fields()
    return {k: v for k, v in request.options.items() if k in mine}


def _sampler_fields() -> set[str]:
    from ..editing.sampler import SamplerOptions

    return {f.name for f in dataclasses.fields(SamplerOptions)}


def request_notices(model, request: EditRequest) -> list[str]:
    """What the CLI would warn about (words the model does not know, a prompt past the text
    encoder's window, characters read as unknown), and an options box that overrides the slider."""
    from ..commands.common import prompt_warnings

    found = prompt_warnings(model, request.source.strip(), "source prompt")
    found += prompt_warnings(model, request.target.strip(), "target prompt")
    given = request.options.get("guidance_scale")
    if given is not None and given != request.guidance:
        found.append(f"guidance_scale {given} from the options box is used, not the slider's {request.guidance}")
    return found


def _request_summary(request: EditRequest) -> list[str]:
    return [f"inversion={','.join(request.inversions)}", f"engine={','.join(request.engines)}",
            f"blend={request.blend.strip()}", f"steps={request.steps}", f"guidance={request.guidance}",
            f"options={json.dumps(request.options, sort_keys=True)}"]


def _zip(folder: Path) -> Path:
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, Path(folder.name) / path.relative_to(folder))
    return archive


__all__ = ["DemoModels", "DemoSession", "ModelChoices", "DemoResult", "DemoRun", "EditRequest", "MAX_UPLOAD_BYTES",
           "MAX_UPLOAD_PIXELS", "blend_suggestions", "parse_options", "read_upload"]

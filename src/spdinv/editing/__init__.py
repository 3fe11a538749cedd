"""Text-driven editing of a real image: invert it under the source prompt with any method, then
sample [source, target] from z_T with any engine (Prompt-to-Prompt, MasaCtrl, Plug-and-Play,
RF-Solver-Edit's value sharing, or none). `edit()` is the one entry point; ENGINES maps engine
names to their options and editors (p2p and masactrl on UNets and on flow transformers' joint
attention, pnp on UNets only, rf_edit on flow transformers only).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from PIL import Image
from torch import Tensor

from ..errors import SpdinvError
from ..images import Framing
from ..inputs import check_prompt_tokens, check_seed, library_image
from ..families import ModelFamily
from ..inversion import METHODS, Inversion, applies_to, check_prompt, get_method, options_for, run_method
from ..model import DiffusionModel
from ..presets import empty_source, engine_settings, preset_model
from .base import Editor, NoEditor, no_editor
from .cache import InversionCache
from .flow_p2p import flow_p2p_editor
from .masactrl import MasaCtrlOptions, masactrl_editor
from .p2p import P2POptions, p2p_editor
from .pnp import PnPOptions, pnp_editor
from .rf_edit import RFEditOptions, rf_edit_editor
from .sampler import SamplerOptions, sample_edit


@dataclass(frozen=True)
class NoOptions:
    """`none` has no options."""


@dataclass(frozen=True)
class Engine:
    options: type
    editor: Callable[[DiffusionModel, str, str, object], Editor]
    summary: str
    denoisers: tuple[str, ...] = ("unet", "transformer")  # the families' denoisers it controls (ModelFamily.denoiser)


def unet_only(name: str, factory: Callable[[DiffusionModel, str, str, object], Editor]):
    """The editor factory of an engine that controls a UNet's attention: refused on a flow transformer."""
    def editor(model: DiffusionModel, source_prompt: str, target_prompt: str, options: object) -> Editor:
        if model.unet is None:
            raise SpdinvError(f"engine {name} does not support rectified-flow transformers yet ({model.family.name}); "
                              "use --engine none")
        return factory(model, source_prompt, target_prompt, options)

    return editor


def by_family(unet_factory: Callable[[DiffusionModel, str, str, object], Editor],
              flow_factory: Callable[[DiffusionModel, str, str, object], Editor]):
    """An engine's editor factory: one for UNets, one for flow transformers' joint attention."""
    def editor(model: DiffusionModel, source_prompt: str, target_prompt: str, options: object) -> Editor:
        factory = flow_factory if model.unet is None else unet_factory
        return factory(model, source_prompt, target_prompt, options)

    return editor


ENGINES: dict[str, Engine] = {
    "p2p": Engine(P2POptions, by_family(p2p_editor, flow_p2p_editor),
                  "Prompt-to-Prompt: refine/replace, reweight, LocalBlend (ICLR 2023); on flow transformers the "
                  "image-query x text-key block of the joint attention"),
    "masactrl": Engine(MasaCtrlOptions, masactrl_editor,
                       "MasaCtrl mutual self-attention (ICCV 2023); on flow transformers the source's image keys and "
                       "values"),
    "pnp": Engine(PnPOptions, unet_only("pnp", pnp_editor),
                  "Plug-and-Play feature and self-attention injection (CVPR 2023); UNets only", denoisers=("unet",)),
    "none": Engine(NoOptions, no_editor, "plain regeneration from z_T with the target prompt"),
    "rf_edit": Engine(RFEditOptions, rf_edit_editor,
                      "RF-Solver-Edit's value sharing in the late blocks' first steps (ICML 2025); flow transformers "
                      "only",
                      denoisers=("transformer",)),
}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise SpdinvError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name]


def engine_applies(model: DiffusionModel, engine: str) -> bool:
    """Whether the engine runs on the model's family (pnp: UNets only; rf_edit: flow transformers only)."""
    return engine_applies_to(model.family, engine)


def engine_applies_to(family: ModelFamily, engine: str) -> bool:
    """Whether the engine controls the attention of this family's denoiser."""
    return family.denoiser in get_engine(engine).denoisers


@dataclass(frozen=True)
class FamilyChoices:
    """What runs on a model family: its inversions (`applies_to`) and engines (`engine_applies_to`),
    in the registries' order."""

    inversions: tuple[str, ...]
    engines: tuple[str, ...]


def family_choices(family: ModelFamily) -> FamilyChoices:
    return FamilyChoices(tuple(name for name in METHODS if applies_to(family, name)),
                         tuple(name for name in ENGINES if engine_applies_to(family, name)))


def check_engine_free(method: str, engines: list[str]) -> None:
    """An inversion-free editor (FlowEdit) edits by its own sampler: engine `none` only."""
    entry = METHODS.get(method)  # a given Inversion may come from elsewhere (the customisation benchmark's noise)
    if entry is not None and entry.engine_free and any(engine != "none" for engine in engines):
        other = next(engine for engine in engines if engine != "none")
        raise SpdinvError(f"{method} edits without an inversion, by its own sampler: it takes engine none only, "
                          f"not {other}")


def check_pairs(inversions: list[str], engines: list[str], empty: str) -> None:
    """At least one inversion method and one engine, every name known, an inversion-free editor
    with engine `none` only; `empty` is the one-line error when either list is empty (worded for
    the caller's interface)."""
    if not inversions or not engines:
        raise SpdinvError(empty)
    for name in engines:
        get_engine(name)
    for name in inversions:
        check_engine_free(name, engines)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_fields(engine: str, method: str | None, options: dict) -> tuple[dict, dict, dict]:
    """Route keyword options to the engine's fields, the sampler's and the inversion method's (dicts)."""
    engine_fields, sampler_fields = _fields(get_engine(engine).options), _fields(SamplerOptions)
    method_fields = _fields(get_method(method).options) if method else set()
    unknown = sorted(set(options) - engine_fields - sampler_fields - method_fields)
    if unknown:
        where = f"engine {engine!r}, the sampler" + (f" or inversion {method!r}" if method else " or a given inversion")
        valid = ", ".join(sorted(engine_fields | sampler_fields | method_fields))
        raise SpdinvError(f"option(s) {', '.join(unknown)} do not apply to {where}; valid: {valid}")
    pick = lambda names: {k: v for k, v in options.items() if k in names}  # noqa: E731
    return pick(engine_fields), pick(sampler_fields), pick(method_fields - engine_fields - sampler_fields)


def split_options(engine: str, method: str | None, options: dict) -> tuple[object, SamplerOptions, dict]:
    """Route keyword options to the engine's options, the sampler's and the inversion method's."""
    engine_fields, sampler_fields, method_fields = split_fields(engine, method, options)
    return get_engine(engine).options(**engine_fields), SamplerOptions(**sampler_fields), method_fields


def given_fields(options: object | dict | None) -> dict:
    """The fields an options value sets: a dict's own, every field of a dataclass, none for None."""
    if options is None:
        return {}
    return dict(options) if isinstance(options, dict) else dataclasses.asdict(options)


def preset_options(preset: str | None, engine: str, engine_options: object | dict | None,
                   sampler: SamplerOptions | dict | None) -> tuple[object, SamplerOptions]:
    """The engine's options and the sampler's: the preset's settings for the engine, overridden by
    the given ones (`given_fields`)."""
    settings = {**engine_settings(preset, engine), **given_fields(engine_options), **given_fields(sampler)}
    chosen, sampler_options, _ = split_options(engine, None, settings)
    return chosen, sampler_options


@dataclass
class EditResult:
    """An edit. Images are (1, 3, H, W) in [-1, 1]: the edited image and the reconstruction (the
    source branch); `mask` is LocalBlend's (1, 1, h, w) at latent size, when one was used;
    `latents` (n + 1, 2, C, h, w) are [source, target] in sampling order; `timings` in seconds;
    `network_calls` the network rows this edit evaluated: the inversion's (its method's and its
    diagnostics', when it was computed for this edit; 0 when it came from a cache or was given)
    and the sampling's, counted at the network (`network_calls_by` splits them)."""

    edited: Tensor
    reconstruction: Tensor
    mask: Tensor | None
    inversion: Inversion
    engine: str
    options: dict
    sampler: dict
    latents: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    cache_hit: bool | None = None
    network_calls_by: dict[str, int] = field(default_factory=dict)

    @property
    def network_calls(self) -> int:
        return sum(self.network_calls_by.values())

    def pil(self) -> tuple[Image.Image, Image.Image]:
        """(edited, reconstruction) as PIL images."""
        from ..images import to_pil

        edited, reconstruction = to_pil(torch.cat([self.edited, self.reconstruction]))
        return edited, reconstruction


def check_prompts(model: DiffusionModel, source_prompt: str, target_prompt: str) -> tuple[str, str]:
    """Both prompts stripped, each refused when empty or when the tokenizer reads nothing in it."""
    prompts = check_prompt(source_prompt, "source prompt"), check_prompt(target_prompt, "target prompt")
    for prompt, what in zip(prompts, ("source prompt", "target prompt")):
        check_prompt_tokens(model.tokenizer, prompt, what)
    return prompts


def check_inversion(model: DiffusionModel, inversion: Inversion, source_prompt: str) -> None:
    """A given inversion must have been computed under this source prompt with this model's text encoder."""
    expected = model.encode_prompt(source_prompt)
    given = inversion.prompt_embedding.to(expected)
    if given.shape != expected.shape or not torch.allclose(given, expected, atol=1e-4, rtol=1e-4):
        raise SpdinvError("the given inversion was computed for another source prompt (or text encoder)")


@contextmanager
def counted_rows(network: torch.nn.Module) -> Iterator[list[int]]:
    """[rows]: every batch row `network` evaluates inside (its first input's, or hidden_states', batch size)."""
    count = [0]

    def hook(module, args, kwargs) -> None:
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        count[0] += int(first.shape[0])

    handle = network.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def run_editor(model: DiffusionModel, inversion: Inversion, target_prompt: str, editor: Editor,
               sampler: SamplerOptions = SamplerOptions(), *, progress: bool = False,
               desc: str = "edit") -> tuple[Tensor, Tensor, float, int]:
    """Sample [source, target] with the editor installed; (decoded images (2, 3, H, W), latents, seconds,
    network rows)."""
    start = time.perf_counter()
    editor.prepare(model, inversion)
    with editor.installed(model.denoiser), counted_rows(model.denoiser) as rows:
        latents = sample_edit(model, inversion, target_prompt, sampler, editor, pin_source=editor.pin_source,
                              empty_source=editor.empty_source, progress=progress, desc=desc)
    seconds = time.perf_counter() - start
    return model.decode(latents[-1]), latents, seconds, rows[0]


InversionSource = str | Inversion  # a method name, or an inversion already computed


def _invert(model: DiffusionModel, image, source_prompt: str, inversion: InversionSource, options: object | None, *,
            num_steps: int, seed: int, progress: bool, cache, diagnose: bool,
            framing: Framing | None) -> tuple[Inversion, bool | None, float]:
    """(the inversion, whether `cache` had it (None without a cache or when given), seconds);
    `options` is the method's options dataclass (None for a given inversion)."""
    start = time.perf_counter()
    if isinstance(inversion, Inversion):
        check_inversion(model, inversion, source_prompt)
        return inversion, None, time.perf_counter() - start
    # only a preset whose protocol inverts under the empty prompt gets here with one
    common = dict(seed=seed, progress=progress, diagnose=diagnose, framing=framing, allow_empty_prompt=not source_prompt)
    if cache is not None:
        inverted, hit = cache.invert(model, image, source_prompt, inversion, num_steps, options=options, **common)
        return inverted, hit, time.perf_counter() - start
    inverted = run_method(model, image, source_prompt, inversion, num_steps, options, **common)
    return inverted, None, time.perf_counter() - start


@dataclass(frozen=True)
class EngineRun:
    """One engine of an `edits()` call, its options made once: the engine's options dataclass, the
    sampler's, the source prompt it runs under (a preset's protocol may use the empty one) and the
    model on the DDIM spacing of the preset's script for this engine (`presets.preset_model`)."""

    engine: str
    options: object
    sampler: SamplerOptions
    source_prompt: str
    model: DiffusionModel


def engine_run(model: DiffusionModel, engine: str, options: object | dict | None, sampler: SamplerOptions | dict | None,
               preset: str | None, source_prompt: str, target_prompt: str) -> EngineRun:
    """The engine's options and the sampler's, typed once (a dataclass as given: it sets every
    field; a dict checked, over the preset's settings), and its words checked against the prompts
    (blend, reweight, replace words), before anything is inverted."""
    kind = get_engine(engine).options
    if options is not None and not isinstance(options, (kind, dict)):
        raise SpdinvError(f"{engine}'s options must be a dict or {kind.__name__}, got {type(options).__name__}")
    if isinstance(options, kind) and isinstance(sampler, SamplerOptions):
        chosen, sampler_options = options, sampler
    elif isinstance(options, kind):
        chosen, sampler_options = options, preset_options(preset, engine, {}, sampler)[1]
    else:
        chosen, sampler_options = preset_options(preset, engine, options, sampler)
    source = "" if empty_source(preset, engine) else source_prompt
    get_engine(engine).editor(model, source, target_prompt, chosen)  # the word checks
    return EngineRun(engine, chosen, sampler_options, source, preset_model(model, preset, engine))


def edits(
    model: DiffusionModel,
    image: Image.Image | Tensor | None,
    source_prompt: str,
    target_prompt: str,
    inversions: list[InversionSource],
    engines: list[str],
    *,
    num_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
    cache=None,
    diagnose: bool = False,
    inversion_options: dict[str, object] | None = None,
    engine_options: dict[str, object] | None = None,
    sampler: SamplerOptions | dict | None = None,
    preset: str | None = None,
    framing: Framing | None = None,
) -> Iterator[EditResult]:
    """Every inversion x engine edit of `image`, inversions in the outer loop: each method inverts
    once (through `cache`, an `InversionCache`, when given) and every engine edits from that
    inversion. `inversion_options` maps a method name to its options dataclass (or a dict of its
    fields), `engine_options` an engine name to its options dataclass (or a dict of its fields),
    `sampler` is SamplerOptions (or a dict of its fields); each becomes its dataclass here, once.
    Every engine's options and words are checked before anything is inverted. A PIL image is
    fitted to the model as `framing` says (`images.Framing`: by default at its own aspect ratio,
    about the model's native area; `Framing(crop=True)`: the centre square;
    `Framing(size=(W, H))`); the edit comes out at that size.

    With `preset` (`spdinv.presets`) every method's and engine's options start from the preset's
    and the given ones override them (a dict sets the fields it has, a dataclass all of its
    fields); engines then run one after the other, since a preset's engines may differ in sampler
    settings and even in the source prompt; each method still inverts once per source prompt.

    Everything is checked when `edits` is called; the iterator it returns does the work."""
    source_prompt, target_prompt = check_prompts(model, source_prompt, target_prompt)
    check_seed(seed)
    image = None if image is None else library_image(image)
    inversion_options, engine_options = inversion_options or {}, engine_options or {}
    methods: dict[str, object] = {}
    for inversion in inversions:
        check_engine_free(inversion.method if isinstance(inversion, Inversion) else inversion, engines)
        if not isinstance(inversion, Inversion):
            methods[inversion] = options_for(inversion, inversion_options.get(inversion), preset)
            if image is None:
                raise SpdinvError("an image is needed unless an inversion is given")
    runs = [engine_run(model, engine, engine_options.get(engine), sampler, preset, source_prompt, target_prompt)
            for engine in engines]
    groups = [runs] if preset is None else [[run] for run in runs]
    return _edit_groups(image, target_prompt, inversions, methods, groups, num_steps=num_steps, seed=seed,
                        progress=progress, cache=cache, diagnose=diagnose, framing=framing)


def _edit_groups(image, target_prompt: str, inversions: list[InversionSource],
                 methods: dict[str, object], groups: list[list[EngineRun]], *, num_steps: int, seed: int,
                 progress: bool, cache, diagnose: bool, framing: Framing | None) -> Iterator[EditResult]:
    """`edits` once everything is checked: for each group of engines, each inversion once (per
    source prompt, across groups), then every engine of the group edits from it."""
    done: dict[tuple, tuple[Inversion, bool | None, float]] = {}  # (method, source prompt, DDIM spacing): once each
    for group in groups:
        group_model = group[0].model  # a group is every engine (one model) or a preset's one engine
        for inversion in inversions:
            given = isinstance(inversion, Inversion)
            key = (inversion.method if given else inversion, group[0].source_prompt, group_model.ddim)
            fresh = given or key not in done  # a preset's engines under one source prompt and spacing share it
            if fresh:
                computed = _invert(group_model, image, key[1], inversion, None if given else methods[inversion],
                                   num_steps=num_steps, seed=seed, progress=progress, cache=cache, diagnose=diagnose,
                                   framing=framing)
                if not given:
                    done[key] = computed
            inverted, hit, inverting = computed if fresh else done[key]
            inverted_here = fresh and not given and not hit
            for run in group:
                yield _edit_with(inverted, target_prompt, run, progress=progress, hit=hit, inverting=inverting,
                                 inverted_here=inverted_here)
                inverted_here = False  # the next engine edits from the same inversion


def _edit_with(inverted: Inversion, target_prompt: str, run: EngineRun, *, progress: bool,
               hit: bool | None, inverting: float, inverted_here: bool) -> EditResult:
    """One engine's edit from an inversion, on the engine's model; its rows counted (the inversion's
    when `inverted_here`)."""
    model = run.model
    editor = get_engine(run.engine).editor(model, run.source_prompt, target_prompt, run.options)
    images, latents, sampling, rows = run_editor(model, inverted, target_prompt, editor, run.sampler,
                                                 progress=progress, desc=f"edit ({inverted.method} + {run.engine})")
    calls = {"invert": inverted.network_calls if inverted_here else 0,
             "diagnostics": inverted.diagnostic_calls if inverted_here else 0, "edit": rows}
    return EditResult(edited=images[1:], reconstruction=images[:1], mask=editor.mask, inversion=inverted,
                      engine=run.engine, options=dataclasses.asdict(run.options),
                      sampler=dataclasses.asdict(run.sampler), latents=latents,
                      timings={"invert": inverting, "edit": sampling, "total": inverting + sampling},
                      cache_hit=hit, network_calls_by=calls)


def edit(
    model: DiffusionModel,
    image: Image.Image | Tensor | None,
    source_prompt: str,
    target_prompt: str,
    inversion: InversionSource = "spdinv",
    engine: str = "p2p",
    *,
    num_steps: int = 50,
    seed: int = 0,
    progress: bool = False,
    cache=None,
    diagnose: bool = False,
    preset: str | None = None,
    framing: Framing | None = None,
    **options,
) -> EditResult:
    """Edit `image` from `source_prompt` to `target_prompt`: invert it with the named method (or
    use the given Inversion), then sample [source, target] from z_T with the named engine; the
    one-pair case of `edits`. Keyword options go to the engine (e.g. blend, cross_replace), the
    sampler (guidance_scale, source_guidance_scale, uncond, negative_prompt) or the inversion
    method (e.g. K, lr); `preset` (`spdinv.presets`: 'spdinv-official', 'pnpinv') starts from a
    published script's settings, which the keyword options override. `diagnose` asks an
    inversion computed here (or by the cache) for its diagnostics; `framing`
    as in `edits`."""
    source_prompt, target_prompt = check_prompts(model, source_prompt, target_prompt)
    given = isinstance(inversion, Inversion)
    if not given:
        get_method(inversion)
        if image is None:
            raise SpdinvError("an image is needed unless an inversion is given")
    engine_fields, sampler_fields, method_fields = split_fields(engine, None if given else inversion, options)
    results = edits(model, image, source_prompt, target_prompt, [inversion], [engine], num_steps=num_steps,
                    seed=seed, progress=progress, cache=cache, diagnose=diagnose,
                    inversion_options={} if given else {inversion: method_fields},
                    engine_options={engine: engine_fields}, sampler=sampler_fields, preset=preset,
                    framing=framing)
    return next(results)


__all__ = ["edit", "edits", "EditResult", "ENGINES", "Engine", "get_engine", "check_pairs", "engine_applies",
           "engine_applies_to", "FamilyChoices", "family_choices",
           "split_options", "split_fields", "preset_options", "run_editor", "counted_rows", "Editor",
           "NoEditor", "P2POptions", "MasaCtrlOptions", "PnPOptions", "RFEditOptions", "NoOptions", "SamplerOptions",
           "InversionCache", "check_inversion"]

"""`spdinv edit`: invert an image under its source prompt and edit it towards a target prompt, for
one or every inversion method x one or every engine; writes the edited image(s), the
reconstruction(s), LocalBlend mask(s), a labelled grid and config.json, all-or-nothing."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..arguments import flag_name
from .common import method_options
from ..errors import SpdinvError, require_finite
from ..images import Framing

_FLOAT16_HINT = {"torch.float16": " (float16 overflows easily: try --dtype float32)"}


def engine_classes() -> dict[str, type]:
    """Engine name -> its options dataclass."""
    from ..editing import ENGINES

    return {name: engine.options for name, engine in ENGINES.items()}


def add_edit_parser(sub) -> None:
    """Register `spdinv edit` on the CLI's subparsers."""
    from ..arguments import add_framing_arguments, add_model_arguments, add_option_arguments, number
    from .common import add_concept_arguments, add_concept_encoder_arguments, add_inversion_arguments, families_epilog
    from ..inversion import METHODS
    from ..editing import ENGINES

    edit = sub.add_parser("edit", epilog=families_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="edit an image from a source prompt to a target prompt (any inversion x any engine)")
    edit.add_argument("image", type=Path)
    edit.add_argument("--source", required=True, help="the source prompt describing the image")
    edit.add_argument("--target", required=True, help="the target prompt describing the edit")
    edit.add_argument("--inversion", default="spdinv",
                      help=f"{', '.join(METHODS)} or all (default spdinv); which run on which model family: below")
    edit.add_argument("--engine", default="p2p",
                      help="; ".join(f"{name}: {e.summary}" for name, e in ENGINES.items())
                      + "; or all (default p2p); which run on which model family: below")
    add_inversion_arguments(edit)
    add_concept_arguments(edit)
    add_concept_encoder_arguments(edit, for_edit=True)
    sampling = edit.add_argument_group("sampling")
    sampling.add_argument("--target-guidance", type=number, default=None, help="the target branch's guidance scale (default 7.5)")
    sampling.add_argument("--source-guidance", type=number, default=None,
                          help="the source branch's guidance scale (default: the inversion's own)")
    sampling.add_argument("--uncond", default=None, choices=("inversion", "source", "empty"),
                          help="unconditional embedding: what the inversion prescribes (default), the source prompt, or ''")
    sampling.add_argument("--negative-prompt", default=None,
                          help="the target branch's unconditional prompt (default: the one --uncond gives both branches)")
    add_preset_argument(edit)
    add_option_arguments(edit, engine_classes())
    add_model_arguments(edit)
    add_framing_arguments(edit)
    edit.add_argument("--out", type=Path, default=Path("spdinv-edit"), help="output folder (default ./spdinv-edit)")
    edit.add_argument("--cache", type=Path, default=None,
                      help="inversion cache folder (default $SPDINV_CACHE or ~/.cache/spdinv/inversions)")
    edit.add_argument("--no-cache", action="store_true", help="neither read nor write the inversion cache")
    edit.set_defaults(run=run_edit)


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """--preset NAME, its help listing what each preset sets."""
    from ..presets import PRESETS, describe

    parser.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="start from a published script's settings (explicit flags override them). "
                             + " | ".join(describe(name) for name in PRESETS))


SAMPLER_FLAGS = {"target_guidance": "guidance_scale", "source_guidance": "source_guidance_scale", "uncond": "uncond",
                 "negative_prompt": "negative_prompt"}


def sampler_fields(args: argparse.Namespace) -> dict:
    """The SamplerOptions fields given on the command line."""
    return {field: getattr(args, dest) for dest, field in SAMPLER_FLAGS.items() if getattr(args, dest, None) is not None}


def _names(value: str, registry: dict, kind: str) -> list[str]:
    if value == "all":
        return list(registry)
    if value not in registry:
        raise SpdinvError(f"unknown {kind} {value!r}; valid: {', '.join(registry)}, all")
    return [value]


def engine_options(given: dict[str, object], engines: list[str], preset: str | None,
                   sampler: dict) -> dict[str, object]:
    """Each selected engine's options dataclass from the option flags given (`given`: dest ->
    value, over the --preset's settings; `sampler`: the sampler fields given); a flag of an
    unselected engine is an error."""
    from ..editing import get_engine, preset_options

    fields = engine_fields(given, engines)
    if preset is None:
        return {engine: get_engine(engine).options(**fields[engine]) for engine in engines}
    return {engine: preset_options(preset, engine, fields[engine], sampler)[0] for engine in engines}


def engine_fields(given: dict[str, object], engines: list[str]) -> dict[str, dict]:
    """Each selected engine's option fields among the option flags given (dest -> value)."""
    from ..arguments import option_flags

    flags = option_flags(engine_classes())
    chosen: dict[str, dict] = {}
    for dest, value in given.items():
        if dest not in flags:
            continue
        owners = flags[dest].fields
        if not set(owners) & set(engines):
            raise SpdinvError(f"{flag_name(dest)} is a {', '.join(owners)} option; the engine is {', '.join(engines)}")
        for engine, name in owners.items():
            chosen.setdefault(engine, {})[name] = value
    return {engine: chosen.get(engine, {}) for engine in engines}


@dataclass(frozen=True)
class EditOutputs:
    """Where an edit's files go and what config.json says of the request besides its runs."""

    out: Path
    image: str  # the input image as given
    seed: int
    steps: int
    preset: str | None = None
    concept: dict | None = None  # `concept_record`: the concept word's file, or its encoder and image
    command: list[str] | None = None  # default: this process's sys.argv


@dataclass
class Run:
    """One inversion x engine result, ready to write."""

    method: str
    engine: str
    edited: object
    reconstruction: object
    mask: object
    psnr: float
    cache: str
    timings: dict
    inversion_settings: dict = dataclasses.field(default_factory=dict)
    sampler: dict = dataclasses.field(default_factory=dict)
    network_calls: dict = dataclasses.field(default_factory=dict)  # UNet rows: {"invert", "diagnostics", "edit"} (the inversion's 0 on a cache hit)


def run_edit(args: argparse.Namespace) -> None:
    from .common import (check_concept_word, check_model_settings, concept_from_args, encoder_choice_from_args,
                            load_model_from_args, prompt_warnings)
    from ..world.concept_choice import encode_with
    from ..arguments import framing_from_args, given_options
    from .common import inversion_classes
    from ..images import open_image, psnr, to_pil, to_tensor
    from ..inversion import METHODS, applies, check_prompt, options_for
    from ..outputs import check_no_foreign, check_output_dir
    from ..editing import ENGINES, check_pairs, edits, engine_applies
    from ..editing.sampler import SamplerOptions

    wall = time.perf_counter()
    source = check_prompt(args.source, "source prompt")
    target = check_prompt(args.target, "target prompt")
    methods = _names(args.inversion, METHODS, "inversion method")
    engines = _names(args.engine, ENGINES, "engine")
    given = given_options(args, {**inversion_classes(), **engine_classes()})  # every option flag typed, read once
    given_sampler = sampler_fields(args)
    per_engine = engine_options(given, engines, args.preset, given_sampler)  # typed once, here
    per_method = method_options(given, methods)  # the flags given, as config.json records them
    typed_methods = {m: options_for(m, per_method[m], args.preset) for m in methods}
    sampler = SamplerOptions(**given_sampler)
    check_output_dir(args.out)
    check_no_foreign(args.out, output_names(methods, engines))
    raw_image, opened = open_image(args.image)  # fail before the model loads; fitting it needs the model's size
    check_model_settings(args)
    prompts = {"source prompt": source, "target prompt": target}
    encoder = encoder_choice_from_args(args)
    concept = concept_from_args(args, prompts)
    concept_image = raw_image
    if encoder is not None:
        check_concept_word(args.concept_word, prompts, "--concept-encoder")
        if args.concept_image is not None:
            concept_image, more = open_image(args.concept_image)
            opened = opened + [f"concept image: {notice}" for notice in more]

    model = load_model_from_args(args)
    mapper = None
    if encoder is not None:
        concept, mapper = encode_with(encoder, model, concept_image, args.concept_word)
        require_finite(concept.vectors, "the encoded concept")
    model = model.with_concept(concept)
    if args.inversion == "all":  # every method that runs on this model's family (FlowEdit: with engine none only)
        methods = [m for m in methods if applies(model, m)
                   and not (METHODS[m].engine_free and set(engines) != {"none"})]
    if args.engine == "all":  # every engine that runs on this model's family
        engines = [e for e in engines if engine_applies(model, e)]
    check_pairs(methods, engines, "no inversion x engine pair applies")
    if args.elite_projections and not args.no_cache:
        print("note: --elite-projections: inversions are not cached (the cache does not key on the projections)",
              file=sys.stderr)
        args.no_cache = True
    loaded = time.perf_counter() - wall
    image, notices = model.fit(raw_image, framing_from_args(args))
    cache, problem = inversion_cache(args)
    results = edits(model, image, source, target, methods, engines, num_steps=args.steps, seed=args.seed,
                    progress=not args.quiet, cache=cache, inversion_options=typed_methods, engine_options=per_engine,
                    sampler=sampler if args.preset is None else given_sampler, preset=args.preset,
                    framing=Framing(size=image.size))  # every word checked here; fitted above
    for notice in opened + notices:
        print(f"note: {notice}", file=sys.stderr)
    for warning in prompt_warnings(model, source, "source prompt") + prompt_warnings(model, target, "target prompt"):
        print(f"warning: {warning}", file=sys.stderr)
    if problem:
        print(f"warning: not caching inversions: {problem}", file=sys.stderr)
    with elite_projections(model, mapper if args.elite_projections else None):
        runs = edit_all(model, results, cache)
    source_tensor = to_tensor(image)
    for run in runs:
        run.psnr = psnr(run.reconstruction, source_tensor)
        run.edited, run.reconstruction = to_pil(run.edited)[0], to_pil(run.reconstruction)[0]
    concept = None if model.concept is None else concept_record(args, model.concept)
    written = EditOutputs(args.out, str(args.image), args.seed, args.steps, args.preset, concept)
    write_outputs(written, model, image, source, target, sampler, per_method, per_engine, runs,
                  {"model_load": loaded, "total": time.perf_counter() - wall})
    for run in runs:
        print(f"{run.method} + {run.engine}: reconstruction PSNR {run.psnr:.2f} dB, invert {run.timings['invert']:.1f} s "
              f"({run.cache}), edit {run.timings['edit']:.1f} s, {sum(run.network_calls.values())} network calls")
    print(f"wrote {args.out} in {time.perf_counter() - wall:.1f} s")


def elite_projections(model, mapper):
    """ELITE's trained key/value projections installed in the UNet while inside (`mapper` None: nothing)."""
    import contextlib

    from ..elite import projections_installed

    return contextlib.nullcontext() if mapper is None else projections_installed(model.unet, mapper)


def inversion_cache(args: argparse.Namespace):
    """(the inversion cache --cache names, or None with --no-cache or when it cannot be written; why not)."""
    from ..editing.cache import InversionCache, default_cache_dir

    if args.no_cache:
        return None, None
    cache = InversionCache(args.cache or default_cache_dir())
    problem = cache.unusable()
    return (None, problem) if problem else (cache, None)


def edit_all(model, results, cache) -> list[Run]:
    """Every edit `results` (the iterator `editing.edits` returned) computes, checked finite, as Runs."""
    hint = _FLOAT16_HINT.get(str(model.dtype), "")
    runs = []
    for result in results:
        method, engine = result.inversion.settings.get("method", result.inversion.method), result.engine
        require_finite(result.inversion.trajectory, f"the {method} inversion" + hint)
        for images in (result.reconstruction, result.edited):
            require_finite(images, f"the {method} + {engine} result" + hint)
        status = "not cached" if cache is None else "cache hit" if result.cache_hit else "cache miss"
        runs.append(Run(method, engine, result.edited, result.reconstruction, result.mask, float("nan"), status,
                        {"invert": result.timings["invert"], "edit": result.timings["edit"]},
                        result.inversion.settings, result.sampler, result.network_calls_by))
    if cache is not None and cache.dropped:
        print(f"note: removed {cache.dropped} damaged inversion cache entr{'y' if cache.dropped == 1 else 'ies'} "
              "and inverted again", file=sys.stderr)
    if cache is not None and cache.problem:
        print(f"warning: inversions not cached: {cache.problem}", file=sys.stderr)
    return runs


def _mask_image(mask, size: tuple[int, int]):
    """LocalBlend's latent-size mask at image size (width, height), nearest."""
    from PIL import Image

    array = (mask[0, 0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(array, mode="L").resize(size, Image.NEAREST)


def output_names(methods: list[str], engines: list[str]) -> list[str]:
    """The files `write_outputs` writes whatever the edits give (mask.png only comes with a mask)."""
    pairs = [(m, e) for m in methods for e in engines]
    suffixes = [""] if len(pairs) == 1 else [f"-{m}-{e}" for m, e in pairs]
    return ["source.png", "grid.png", "config.json",
            *(f"{kind}{suffix}.png" for suffix in suffixes for kind in ("edit", "reconstruction"))]


def write_outputs(outputs: EditOutputs, model, image, source: str, target: str, sampler, per_method: dict,
                  per_engine: dict, runs: list[Run], timings: dict) -> None:
    """edit.png / reconstruction.png / mask.png (suffixed -METHOD-ENGINE when several), source.png,
    grid.png and config.json, moved into `outputs.out` only when all are written."""
    from ..outputs import staged_output, write_json
    from ..editing.grid import labelled_grid

    single = len(runs) == 1
    records, rows = [], []
    with staged_output(outputs.out) as stage:
        image.save(stage / "source.png")
        for run in runs:
            suffix = "" if single else f"-{run.method}-{run.engine}"
            files = {"edit": f"edit{suffix}.png", "reconstruction": f"reconstruction{suffix}.png"}
            run.edited.save(stage / files["edit"])
            run.reconstruction.save(stage / files["reconstruction"])
            mask = None
            if run.mask is not None:
                mask = _mask_image(run.mask, image.size)
                files["mask"] = f"mask{suffix}.png"
                mask.save(stage / files["mask"])
            rows.append((f"{run.method} + {run.engine}", [image, run.reconstruction, run.edited, mask]))
            records.append({"inversion": run.method, "engine": run.engine, "inversion_options": per_method[run.method],
                            "inversion_settings": run.inversion_settings, "sampler": run.sampler,
                            "engine_options": dataclasses.asdict(per_engine[run.engine]), "cache": run.cache,
                            "reconstruction_psnr": run.psnr, "timings": run.timings,
                            "network_calls": run.network_calls, "files": files})
        columns = ["source", "reconstruction", "edit"]
        if any(mask is not None for _, (*_, mask) in rows):
            columns.append("LocalBlend mask")
        else:
            rows = [(label, cells[:3]) for label, cells in rows]
        labelled_grid(rows, columns, [f"source: {source}", f"target: {target}"]).save(stage / "grid.png")
        write_json(stage / "config.json", {
            "source": source, "target": target, "image": outputs.image, "model": model.name,
            "family": model.family.name, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "seed": outputs.seed, "steps": outputs.steps, "preset": outputs.preset,
            "sampler": dataclasses.asdict(sampler), "runs": records, "timings": timings, "concept": outputs.concept,
            "command": sys.argv if outputs.command is None else outputs.command,
        })


def concept_record(args, concept) -> dict:
    """What config.json says about the concept: its file, or the encoder and image it came from."""
    record = {"word": concept.word, "vectors": concept.vectors.shape[0], "fingerprint": concept.fingerprint}
    encoder = getattr(args, "concept_encoder", None)
    if encoder is None:
        return {"file": str(args.concept), **record}
    world = Path(encoder).suffix.lower() == ".safetensors"  # a spdinv encoder: the shape reader applies
    return {"encoder": str(encoder), "image_encoder": None if args.image_encoder is None else str(args.image_encoder),
            "image": str(args.concept_image or args.image), "elite_projections": bool(args.elite_projections),
            "shape_reader": (args.shape_reader or "shipped") if world else None, **record}

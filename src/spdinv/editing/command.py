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

from ..errors import SpdinvError

# command-line dest -> (engine, option field)
ENGINE_FLAGS = {
    "blend": ("p2p", "blend"),
    "p2p_mode": ("p2p", "mode"),
    "cross_replace": ("p2p", "cross_replace"),
    "self_replace": ("p2p", "self_replace"),
    "self_replace_scale": ("p2p", "self_replace_scale"),
    "reweight": ("p2p", "reweight"),
    "reweight_words": ("p2p", "reweight_words"),
    "blend_threshold": ("p2p", "blend_threshold"),
    "blend_start": ("p2p", "blend_start"),
    "blend_scale": ("p2p", "blend_scale"),
    "blend_norm": ("p2p", "blend_norm"),
    "prox": ("p2p", "prox"),
    "prox_quantile": ("p2p", "prox_quantile"),
    "prox_timestep": ("p2p", "prox_timestep"),
    "start_step": ("masactrl", "start_step"),
    "start_layer": ("masactrl", "start_layer"),
    "pin_source": ("masactrl", "pin_source"),
    "feature_injection": ("pnp", "feature_injection"),
    "attention_injection": ("pnp", "attention_injection"),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_edit_parser(sub) -> None:
    """Register `spdinv edit` on the CLI's subparsers."""
    from ..cli import add_inversion_arguments, add_model_arguments
    from ..inversion import METHODS
    from . import ENGINES

    edit = sub.add_parser("edit", help="edit an image from a source prompt to a target prompt (any inversion x any engine)")
    edit.add_argument("image", type=Path)
    edit.add_argument("--source", required=True, help="the source prompt describing the image")
    edit.add_argument("--target", required=True, help="the target prompt describing the edit")
    edit.add_argument("--inversion", default="spdinv", help=f"{', '.join(METHODS)} or all (default spdinv)")
    edit.add_argument("--engine", default="p2p",
                      help="; ".join(f"{name}: {e.summary}" for name, e in ENGINES.items()) + "; or all (default p2p)")
    edit.add_argument("--blend", default=None, help="p2p LocalBlend words: 'SOURCE_WORD TARGET_WORD', or one word for both")
    add_inversion_arguments(edit)
    sampling = edit.add_argument_group("sampling")
    sampling.add_argument("--target-guidance", type=_number, default=7.5, help="the target branch's guidance scale (default 7.5)")
    sampling.add_argument("--source-guidance", type=_number, default=None,
                          help="the source branch's guidance scale (default: the inversion's own)")
    sampling.add_argument("--uncond", default="inversion", choices=("inversion", "source", "empty"),
                          help="unconditional embedding: what the inversion prescribes (default), the source prompt, or ''")
    p2p = edit.add_argument_group("p2p options")
    p2p.add_argument("--p2p-mode", default=None, help="refine (default) or replace (equal token counts)")
    p2p.add_argument("--cross-replace", type=_number, default=None, help="fraction of steps with injected cross-attention (0.8)")
    p2p.add_argument("--self-replace", type=_number, default=None, help="fraction of steps with injected self-attention (0.6)")
    p2p.add_argument("--self-replace-scale", type=_number, default=None,
                     help="finest self-attention resolution injected, relative to the latent (0.5)")
    p2p.add_argument("--reweight", type=_number, default=None, help="cross-attention scale of the reweighted words (2)")
    p2p.add_argument("--reweight-words", default=None, help="target words to reweight (default: the target blend word)")
    p2p.add_argument("--blend-threshold", type=_number, default=None, help="LocalBlend mask threshold (0.3)")
    p2p.add_argument("--blend-start", type=_number, default=None, help="fraction of steps before LocalBlend starts (0.2)")
    p2p.add_argument("--blend-scale", type=_number, default=None, help="resolution of the maps LocalBlend reads, relative to the latent (default: the maps 16 tokens a side)")
    p2p.add_argument("--blend-norm", default=None, choices=("max", "range"),
                     help="LocalBlend map scaling before the threshold: range (minus its min, default) or max (P2P's)")
    p2p.add_argument("--prox", action="store_true", default=None, help="ProxEdit proximal guidance (off by default)")
    p2p.add_argument("--prox-quantile", type=_number, default=None, help="ProxEdit threshold quantile (0.7)")
    p2p.add_argument("--prox-timestep", type=_integer, default=None, help="ProxEdit pulls back below this timestep (400)")
    masa = edit.add_argument_group("masactrl options")
    masa.add_argument("--start-step", type=_number, default=None, help="fraction of steps before mutual attention (0.08)")
    masa.add_argument("--start-layer", type=_number, default=None, help="fraction of self-attention layers before it (0.625)")
    masa.add_argument("--pin-source", action="store_true", default=None, help="pin the source branch to the trajectory")
    pnp = edit.add_argument_group("pnp options")
    pnp.add_argument("--feature-injection", type=_number, default=None, help="fraction of steps with feature injection (0.8)")
    pnp.add_argument("--attention-injection", type=_number, default=None, help="fraction of steps with Q/K injection (0.5)")
    add_model_arguments(edit)
    edit.add_argument("--out", type=Path, default=Path("spdinv-edit"), help="output folder (default ./spdinv-edit)")
    edit.add_argument("--cache", type=Path, default=None,
                      help="inversion cache folder (default $SPDINV_CACHE or ~/.cache/spdinv/inversions)")
    edit.add_argument("--no-cache", action="store_true", help="neither read nor write the inversion cache")
    edit.set_defaults(run=run_edit)


def _names(value: str, registry: dict, kind: str) -> list[str]:
    if value == "all":
        return list(registry)
    if value not in registry:
        raise SpdinvError(f"unknown {kind} {value!r}; valid: {', '.join(registry)}, all")
    return [value]


def engine_options(args: argparse.Namespace, engines: list[str]) -> dict[str, object]:
    """Each selected engine's options dataclass from the flags given; a flag of an unselected engine is an error."""
    from . import get_engine

    given: dict[str, dict] = {}
    for dest, (engine, name) in ENGINE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if engine not in engines:
            raise SpdinvError(f"{_flag(dest)} is a {engine} option; the engine is {', '.join(engines)}")
        if name == "reweight_words":
            value = tuple(value.split())
        given.setdefault(engine, {})[name] = value
    return {engine: get_engine(engine).options(**given.get(engine, {})) for engine in engines}


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    """Each selected method's options from the inversion flags given (with `all`, each method takes
    those it has); a flag no selected method has is an error."""
    from ..cli import INVERSION_OPTIONS
    from ..inversion import get_method, make_options

    given = {name: getattr(args, name) for name in INVERSION_OPTIONS if getattr(args, name, None) is not None}
    fields = {m: {f.name for f in dataclasses.fields(get_method(m).options)} for m in methods}
    unused = sorted(set(given) - set().union(*fields.values()))
    if unused:
        raise SpdinvError(f"{', '.join(_flag(u) for u in unused)} do(es) not apply to inversion {', '.join(methods)}")
    chosen = {m: {k: v for k, v in given.items() if k in fields[m]} for m in methods}
    for m, options in chosen.items():
        make_options(m, **options)
    return chosen


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


def run_edit(args: argparse.Namespace) -> None:
    from ..images import conform_image, open_image, psnr, to_pil, to_tensor
    from ..inversion import METHODS, check_prompt
    from ..outputs import check_output_dir
    from . import ENGINES
    from .sampler import SamplerOptions

    wall = time.perf_counter()
    source = check_prompt(args.source, "source prompt")
    target = check_prompt(args.target, "target prompt")
    methods = _names(args.inversion, METHODS, "inversion method")
    engines = _names(args.engine, ENGINES, "engine")
    per_engine = engine_options(args, engines)
    per_method = method_options(args, methods)
    sampler = SamplerOptions(guidance_scale=args.target_guidance, source_guidance_scale=args.source_guidance,
                             uncond=args.uncond)
    check_output_dir(args.out)
    raw_image = open_image(args.image)  # fail before the model loads; fitting it needs the model's size

    from ..model import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    loaded = time.perf_counter() - wall
    image, notices = conform_image(raw_image, model.image_size)
    for engine in engines:  # word checks (blend, reweight, replace) before any inversion
        ENGINES[engine].editor(model, source, target, per_engine[engine])
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    runs = edit_all(model, image, source, target, methods, engines, per_method, per_engine, sampler, args)
    source_tensor = to_tensor(image)
    for run in runs:
        run.psnr = psnr(run.reconstruction, source_tensor)
        run.edited, run.reconstruction = to_pil(run.edited)[0], to_pil(run.reconstruction)[0]
    write_outputs(args, model, image, source, target, sampler, per_method, per_engine, runs,
                  {"model_load": loaded, "total": time.perf_counter() - wall})
    for run in runs:
        print(f"{run.method} + {run.engine}: reconstruction PSNR {run.psnr:.2f} dB, invert {run.timings['invert']:.1f} s "
              f"({run.cache}), edit {run.timings['edit']:.1f} s")
    print(f"wrote {args.out} in {time.perf_counter() - wall:.1f} s")


def edit_all(model, image, source: str, target: str, methods: list[str], engines: list[str], per_method: dict,
             per_engine: dict, sampler, args: argparse.Namespace) -> list[Run]:
    """Invert once per method (through the cache), then edit with every engine."""
    from ..inversion import invert
    from . import ENGINES, run_editor
    from .cache import InversionCache, default_cache_dir

    cache = None if args.no_cache else InversionCache(args.cache or default_cache_dir())
    runs = []
    for method in methods:
        start = time.perf_counter()
        if cache is None:
            inversion, status = invert(model, image, source, method, args.steps, seed=args.seed, diagnose=False,
                                       progress=not args.quiet, **per_method[method]), "not cached"
        else:
            inversion, hit = cache.invert(model, image, source, method, args.steps, seed=args.seed,
                                          progress=not args.quiet, **per_method[method])
            status = "cache hit" if hit else "cache miss"
        inverting = time.perf_counter() - start
        for engine in engines:
            editor = ENGINES[engine].editor(model, source, target, per_engine[engine])
            images, _, seconds = run_editor(model, inversion, target, editor, sampler, progress=not args.quiet,
                                            desc=f"edit ({method} + {engine})")
            runs.append(Run(method, engine, images[1:], images[:1], editor.mask, float("nan"), status,
                            {"invert": inverting, "edit": seconds}))
    return runs


def _mask_image(mask, size: int):
    from PIL import Image

    array = (mask[0, 0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(array, mode="L").resize((size, size), Image.NEAREST)


def write_outputs(args, model, image, source: str, target: str, sampler, per_method: dict, per_engine: dict,
                  runs: list[Run], timings: dict) -> None:
    """edit.png / reconstruction.png / mask.png (suffixed -METHOD-ENGINE when several), source.png,
    grid.png and config.json, moved into --out only when all are written."""
    from ..outputs import staged_output, write_json
    from .grid import labelled_grid

    single = len(runs) == 1
    records, rows = [], []
    with staged_output(args.out) as stage:
        image.save(stage / "source.png")
        for run in runs:
            suffix = "" if single else f"-{run.method}-{run.engine}"
            files = {"edit": f"edit{suffix}.png", "reconstruction": f"reconstruction{suffix}.png"}
            run.edited.save(stage / files["edit"])
            run.reconstruction.save(stage / files["reconstruction"])
            mask = None
            if run.mask is not None:
                mask = _mask_image(run.mask, image.size[0])
                files["mask"] = f"mask{suffix}.png"
                mask.save(stage / files["mask"])
            rows.append((f"{run.method} + {run.engine}", [image, run.reconstruction, run.edited, mask]))
            records.append({"inversion": run.method, "engine": run.engine, "inversion_options": per_method[run.method],
                            "engine_options": dataclasses.asdict(per_engine[run.engine]), "cache": run.cache,
                            "reconstruction_psnr": run.psnr, "timings": run.timings, "files": files})
        columns = ["source", "reconstruction", "edit"]
        if any(mask is not None for _, (*_, mask) in rows):
            columns.append("LocalBlend mask")
        else:
            rows = [(label, cells[:3]) for label, cells in rows]
        labelled_grid(rows, columns, [f"source: {source}", f"target: {target}"]).save(stage / "grid.png")
        write_json(stage / "config.json", {
            "source": source, "target": target, "image": str(args.image), "model": model.name,
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "seed": args.seed,
            "steps": args.steps, "sampler": dataclasses.asdict(sampler), "runs": records, "timings": timings,
            "command": sys.argv,
        })

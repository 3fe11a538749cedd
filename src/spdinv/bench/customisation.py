"""The customisation benchmark: concept edit pairs of the world (world/concept_edits.py), each edited
by every method, one CSV row per pair x method.

A method is where the concept word's embedding comes from (`encoder`: the ELITE-style concept
encoder; `textual-inversion`: `learn_concept` on the source image) and how the edit starts: from a
seeded random latent with the target prompt alone (ELITE's own generation: no inversion, no
engine), or from the source image inverted by DDIM / SPDInv / AIDI and edited with Prompt-to-Prompt.
Every edit goes through `spdinv.editing.edit()`. Scores: the bench evaluator's (background
preservation, edit-region truth, edit accuracy) plus concept fidelity, the attribute classifier's
reading of the concept's shape, colour, material and style at its target position.

Resumable: rows already in results.csv are skipped; learned concepts are kept in concepts/.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..concepts import Concept, load_concept, save_concept
from ..errors import SpdinvError, require_finite
from ..images import conform_image, to_pil
from ..inversion import Inversion
from ..model import DiffusionModel
from ..outputs import write_json
from ..textual_inversion import LearnOptions, learn_concept
from ..world.concept_edits import IDENTITY, ConceptPair, concept_pairs, held_out_rule
from .metrics import EvaluationModels, Evaluator, Sample, parse_metrics
from .results import (ERROR_COLUMN, RESULTS_FILE, SETTINGS_FILE, PartWriter, columns, format_value, read_rows,
                      recorded_settings, row_key)

ENCODER, TEXTUAL_INVERSION = "encoder", "textual-inversion"
CONCEPT_COLUMNS = tuple(f"concept_{a}" for a in IDENTITY) + ("concept_fidelity",)
EXTRA_COLUMNS = CONCEPT_COLUMNS + ("held_out", "concept_seconds")
DEFAULT_METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited", "gt_psnr",
                   "gt_ssim", "edit_accuracy", "noise_error", "network_calls", "seconds", "edit_seconds")


@dataclass(frozen=True)
class CustomMethod:
    """concept: ENCODER or TEXTUAL_INVERSION; inversion: a method name, None for a random latent;
    inversion_options: e.g. {"solver": "anderson"}."""

    concept: str
    inversion: str | None
    inversion_options: dict = field(default_factory=dict, hash=False)

    @property
    def engine(self) -> str:
        return "none" if self.inversion is None else "p2p"


METHODS: dict[str, CustomMethod] = {
    "elite-noise": CustomMethod(ENCODER, None),
    "elite+spdinv": CustomMethod(ENCODER, "spdinv"),
    "elite+spdinv-anderson": CustomMethod(ENCODER, "spdinv", {"solver": "anderson"}),
    "elite+ddim": CustomMethod(ENCODER, "ddim"),
    "elite+aidi": CustomMethod(ENCODER, "aidi"),
    "ti-noise": CustomMethod(TEXTUAL_INVERSION, None),
    "ti+spdinv": CustomMethod(TEXTUAL_INVERSION, "spdinv"),
    "ti+spdinv-anderson": CustomMethod(TEXTUAL_INVERSION, "spdinv", {"solver": "anderson"}),
    "ti+ddim": CustomMethod(TEXTUAL_INVERSION, "ddim"),
    "ti+aidi": CustomMethod(TEXTUAL_INVERSION, "aidi"),
}


class ConceptEncoder(Protocol):
    def encode(self, image: Image.Image, word: str = "S") -> Concept: ...


@dataclass
class CustomisationOptions:
    out: Path
    methods: list[str]
    pairs: int = 40
    seed: int = 0  # the pairs', the inversions' and the random latents'
    steps: int = 50
    guidance_scale: float = 7.5
    held_out: str = "encoder"  # a held_out_rule spec; "encoder": the concept encoder's held-out set
    learn: LearnOptions = field(default_factory=LearnOptions)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    evaluation: EvaluationModels = field(default_factory=EvaluationModels)
    progress: bool = True
    save_images: bool = False  # every edit as out/images/METHOD/ID.png


def check_methods(names: list[str]) -> list[str]:
    if not names:
        raise SpdinvError("give at least one method")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SpdinvError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    return names


def noise_inversion(model: DiffusionModel, source_prompt: str, num_steps: int, seed: int) -> Inversion:
    """A seeded random z_T dressed as an inversion of nothing: sampling it with the `none` engine is
    generation from random noise (ELITE's), through the same `edit()` path as every other row."""
    side = model.image_size // model.vae_scale_factor
    shape = (1, int(model.unet.config.in_channels), side, side)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return Inversion(method="noise", trajectory=z_T.to(model.device, model.dtype), schedule=model.schedule(num_steps),
                     prompt_embedding=model.encode_prompt(source_prompt), steps=[], settings={"seed": seed})


def edit_with_concept(model: DiffusionModel, concept: Concept, pair: ConceptPair, method: CustomMethod,
                      image: Image.Image | None, *, steps: int, seed: int, guidance_scale: float):
    """One row's edit (spdinv.editing.EditResult); `image` is not read by a random-noise method."""
    from ..editing import edit

    concept_model = model.with_concept(concept)
    if method.inversion is None:
        start = noise_inversion(concept_model, pair.source_prompt, steps, seed + int(pair.id))
        return edit(concept_model, None, pair.source_prompt, pair.target_prompt, inversion=start, engine="none",
                    num_steps=steps, seed=seed, guidance_scale=guidance_scale)
    blend = {"blend": pair.blend_words} if pair.blend_words else {}
    source = conform_image(image, model.image_size)[0]
    return edit(concept_model, source, pair.source_prompt, pair.target_prompt, inversion=method.inversion,
                engine="p2p", num_steps=steps, seed=seed, guidance_scale=guidance_scale, **blend,
                **method.inversion_options)


def concept_fidelity(classifier: torch.nn.Module, edited: Image.Image, pair: ConceptPair) -> dict[str, float]:
    """1/0 per identity attribute: does the classifier read the concept's shape, colour, material and
    style at the concept's target position; concept_fidelity: all four."""
    from ..world.classifier import read_scenes
    from .metrics import to_unit

    reading = read_scenes(classifier, to_unit(edited.convert("RGB").resize((64, 64), Image.LANCZOS)) * 2 - 1)[0]
    concept = pair.target.objects[0]
    found = reading.objects.get(concept.position, {})
    scores = {f"concept_{a}": float(found.get(a) == getattr(concept, a)) for a in IDENTITY}
    scores["concept_fidelity"] = float(all(scores.values()))
    return scores


def scene_dict(scene) -> dict:
    return {"background": scene.background, "background_kind": scene.background_kind,
            "objects": [dataclasses.asdict(o) for o in scene.objects]}


class ConceptStore:
    """The concept of each pair and source, computed once and kept in `folder` (for resuming)."""

    def __init__(self, folder: Path, model: DiffusionModel, learn: LearnOptions,
                 encoder_factory: Callable[[], ConceptEncoder] | None, word: str = "S", encoder_id: str | None = None):
        self.folder, self.model, self.learn, self.word = folder, model, learn, word
        self.encoder_factory, self._encoder, self.encoder_id = encoder_factory, None, encoder_id

    def get(self, pair: ConceptPair, kind: str, image: Image.Image) -> tuple[Concept, float]:
        """Textual inversion learns from `image` (the source) under the source prompt; the encoder
        reads the concept image of the pair's object (its convention: alone, large, centred, on gray)."""
        path = self.folder / f"{pair.id}-{kind}.safetensors"
        seconds_path = path.with_suffix(".json")
        made_by = self.encoder_id if kind == ENCODER else None
        if path.is_file() and seconds_path.is_file():
            record = json.loads(seconds_path.read_text())
            if record.get("made_by") != made_by:
                raise SpdinvError(f"{path} was made by another concept encoder ({record.get('made_by')} vs {made_by}): "
                                  "use another output folder")
            return load_concept(path, self.word), float(record["seconds"])
        started = time.perf_counter()
        if kind == TEXTUAL_INVERSION:
            learned = learn_concept(self.model, image, pair.source_prompt, self.word, self.learn, progress=False)
            concept = learned.concept
        else:
            if self._encoder is None:
                if self.encoder_factory is None:
                    raise SpdinvError("the encoder methods need a concept encoder")
                self._encoder = self.encoder_factory()
            from ..world.concept_encoder import concept_image

            concept = self._encoder.encode(concept_image(pair.concept), word=self.word)
        seconds = time.perf_counter() - started
        self.folder.mkdir(parents=True, exist_ok=True)
        save_concept(concept, path)
        write_json(seconds_path, {"seconds": seconds, "made_by": made_by})
        return concept, seconds


def default_encoder_factory() -> ConceptEncoder:
    from ..world.concept_encoder import load_concept_encoder  # the trained ELITE-style encoder

    return load_concept_encoder()


def encoder_fingerprint() -> str | None:
    """The shipped concept encoder's file, hashed (None when absent)."""
    import hashlib

    from ..world.concept_encoder import ENCODER_PATH

    return hashlib.sha256(ENCODER_PATH.read_bytes()).hexdigest()[:16] if ENCODER_PATH.is_file() else None


def run_settings(options: CustomisationOptions) -> dict:
    return {"pairs": options.pairs, "seed": options.seed, "steps": options.steps,
            "guidance_scale": options.guidance_scale, "held_out": options.held_out,
            "learn": dataclasses.asdict(options.learn), "metrics": list(options.metrics)}


def check_settings(options: CustomisationOptions) -> None:
    """A resumed run must have the settings of the rows it keeps (methods may be added)."""
    settings = run_settings(options)
    if recorded_settings(options.out, settings, settings) is not None:
        return
    options.out.mkdir(parents=True, exist_ok=True)
    write_json(options.out / SETTINGS_FILE, settings)


def run_customisation(options: CustomisationOptions, model: DiffusionModel | None = None,
                      encoder_factory: Callable[[], ConceptEncoder] | None = default_encoder_factory) -> Path:
    """Run (or resume) the benchmark; the path of results.csv."""
    check_methods(options.methods)
    options.metrics = parse_metrics(list(options.metrics))
    pairs = concept_pairs(options.pairs, options.seed, held_out_rule(options.held_out))
    check_settings(options)
    header = columns([*options.metrics, *EXTRA_COLUMNS])
    results = options.out / RESULTS_FILE
    done = {row_key(r) for r in read_rows(results, header)}
    jobs = [(pair, name) for pair in pairs for name in options.methods
            if (pair.id, name, METHODS[name].engine) not in done]
    if not jobs:
        return results
    if model is None:
        from ..model import load_model

        model = load_model(None)
    from ..world.classifier import load_classifier

    evaluator = Evaluator(list(options.metrics), options.evaluation)
    for notice in evaluator.notices:
        print(f"note: {notice}", flush=True)
    classifier = load_classifier()
    encoder_id = encoder_fingerprint() if encoder_factory is default_encoder_factory else None
    store = ConceptStore(options.out / "concepts", model, options.learn, encoder_factory, encoder_id=encoder_id)
    writer = PartWriter(results, header)
    try:
        for pair, name in tqdm(jobs, desc="customisation", unit="edit", disable=not options.progress):
            writer.append(run_row(model, pair, name, store, evaluator, classifier, options))
    finally:
        writer.close()
    return results


def run_row(model: DiffusionModel, pair: ConceptPair, name: str, store: ConceptStore, evaluator: Evaluator,
            classifier: torch.nn.Module, options: CustomisationOptions) -> dict[str, str]:
    method = METHODS[name]
    row = {"id": pair.id, "category": pair.edit, "inversion": name, "engine": method.engine,
           "held_out": format_value(float(pair.held_out)), ERROR_COLUMN: ""}
    source_image, target_image = pair.images()
    try:
        concept, concept_seconds = store.get(pair, method.concept, source_image)
        started = time.perf_counter()
        torch.manual_seed(options.seed)
        result = edit_with_concept(model, concept, pair, method, source_image, steps=options.steps, seed=options.seed,
                                   guidance_scale=options.guidance_scale)
        seconds = time.perf_counter() - started
        require_finite(result.edited, f"the {name} edit")
    except SpdinvError as error:
        row[ERROR_COLUMN] = str(error).splitlines()[0] if str(error) else type(error).__name__
        row.update({m: "nan" for m in [*options.metrics, *CONCEPT_COLUMNS, "concept_seconds"]})
        return row
    edited = to_pil(result.edited)[0]
    if edited.size != source_image.size:
        edited = edited.resize(source_image.size, Image.LANCZOS)
    sample = Sample(source=source_image, edited=edited, mask=pair.mask(), target_prompt=pair.target_prompt,
                    target=target_image, target_scene=scene_dict(pair.target),
                    inversion=None if method.inversion is None else result.inversion, edit_seconds=seconds)
    if options.save_images:
        path = options.out / "images" / name / f"{pair.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        edited.save(path)
    scores = evaluator.evaluate(sample)
    scores.update(concept_fidelity(classifier, edited, pair))
    scores["concept_seconds"] = concept_seconds
    row.update({k: format_value(v) for k, v in scores.items()})
    return row


__all__ = ["METHODS", "CustomMethod", "CustomisationOptions", "run_customisation", "run_row", "noise_inversion",
           "edit_with_concept", "concept_fidelity", "ConceptStore", "check_methods"]

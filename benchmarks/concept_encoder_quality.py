"""Concept fidelity of the shapes-world concept encoder (numbers go to docs/model-card.md, "Concept encoder").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/concept_encoder_quality.py \
        [--encoder PATH] [--n 32] [--ti 4] [--drawn 32] [--shape-reader shipped] [--rows "text;reader w0"] [--json out.json]

For `--n` object identities the encoder was trained on and `--n` of the held-out shape x colour pairs
(seeded draws), the concept image (the object alone, large, centre, on gray) is encoded, and the
shipped model generates each context prompt from random noise (stock diffusers pipeline, 50 DDIM
steps, guidance 7.5): "a large S in the centre on a <background> background" and "a small S on the
<side> on a <background> background" (background and side drawn per object, never the object's
colour). The attribute classifier reads every image; an attribute is kept when the object read at
the captioned position (else the only object read anywhere) has it. Rows:
- encoder w0: the concept word as used at generation (w0 alone);
- encoder, all words: the placeholder spelled as every level's word (how half the training sees it);
- text: the object's own words in place of S (the upper reference);
- reader w0 (with `--shape-reader`): the concept `spdinv.world.shape_reader.read_concept` makes (the encoder's
  w0 of the render of the identity read: the reader's shape, the colour, material and style of the encoder's
  nearest identity; issue 26);
- textual inversion: `spdinv.textual_inversion.learn_concept` (default 150 steps, on the concept image
  under "a large S in the centre on a gray background") for the first `--ti` objects of each group,
  with the encoder and text rows on the same objects for comparison.
With `--drawn N`, a third group: N plain filled objects (seeded draws over every shape x colour) whose
concept images are drawn with PIL by `spdinv.testing.hand_drawn_object` (its own geometry, size, offset,
rotation and shade, aliased, on the world's gray) instead of the world renderer: images it did not draw.
With `--test-drawn N`, a fourth group ("drawn (test family)"): N plain filled objects drawn by this folder's
`concept_test_drawings.test_drawing` (other proportions, gradients, outlines, anti-aliasing: code none of the
project's own drawing code shares, the concept encoder's training drawer included). `--n 0` leaves out the
seen and held-out groups.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from dataclasses import replace

import torch

from spdinv.concepts import ConceptTokenizer, injected
from spdinv.images import to_tensor
from spdinv.model import load_model
from spdinv.testing import hand_drawn_object
from spdinv.textual_inversion import LearnOptions, learn_concept
from spdinv.world.captions import caption
from spdinv.world.classifier import load_classifier, read_scenes, single_object
from spdinv.world.concept_encoder import CONCEPT_BACKGROUND, concept_image, identities, is_held_out, load_concept_encoder
from spdinv.world.concept_training import encoder_from_checkpoint
from spdinv.world.scene import BACKGROUNDS, COLOURS, SIDE_POSITIONS, Scene
from spdinv.world.shape_reader import load_shape_reader, read_concept

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concept_test_drawings import test_drawing  # noqa: E402

WORD = "S"
ATTRIBUTES = ("shape", "colour", "material", "style")


def contexts(obj, rng: random.Random) -> list[Scene]:
    """The object large in the centre, then small at a side, each on a drawn plain background."""
    backgrounds = [b for b in BACKGROUNDS if b != obj.colour]
    return [Scene((replace(obj, position="centre", size="large"),), rng.choice(backgrounds)),
            Scene((replace(obj, position=rng.choice(SIDE_POSITIONS), size="small"),), rng.choice(backgrounds))]


def embed(model, prompts: list[str], vectors: torch.Tensor | None) -> torch.Tensor:
    """Prompt embeddings; with `vectors` (B, k, width), prompt b's S is vectors[b]."""
    if vectors is None:
        return model.encode_prompt(prompts)
    tokenizer = ConceptTokenizer(model.tokenizer, WORD, vectors.shape[1])
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad(), injected(model.text_encoder, tokenizer.first_id, vectors):
        return model.text_encoder(ids.to(model.device))[0].float()


def generate(pipe, model, embeddings: torch.Tensor, seed: int, batch: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    uncond = model.encode_prompt([""])
    images = []
    for chunk in embeddings.split(batch):
        out = pipe(prompt_embeds=chunk, negative_prompt_embeds=uncond.expand(len(chunk), -1, -1),
                   num_inference_steps=50, guidance_scale=7.5, generator=generator, output_type="pt").images
        images.append(out.cpu() * 2 - 1)
    return torch.cat(images)


def kept(reading, scene: Scene) -> dict[str, bool]:
    obj = scene.objects[0]
    found = single_object(reading, obj.position)
    flags = {a: found is not None and found[a] == getattr(obj, a) for a in ATTRIBUTES}
    flags["identity"] = all(flags.values())
    flags["background"] = reading.background == scene.background
    return flags


def score(classifier, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    flags = [kept(r, s) for r, s in zip(read_scenes(classifier, images), scenes)]
    return {k: sum(f[k] for f in flags) / len(flags) for k in flags[0]} | {"images": len(flags)}


def stock_pipeline(model):
    """The stock diffusers pipeline on the model's parts (no progress bars)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def drawn_groups(args, everything) -> dict[str, tuple[list, list]]:
    """The drawn groups asked for: (objects, concept images) per group, each from its own draws (the other
    groups stay as without them)."""
    filled = [o for o in everything if o.material == "plain" and o.style == "filled"]
    gray = BACKGROUNDS[CONCEPT_BACKGROUND]
    out = {}
    for group, count, drawing, draw in (("drawn", args.drawn, random.Random(args.seed + 1), hand_drawn_object),
                                        ("drawn (test family)", args.test_drawn,
                                         random.Random(f"{args.seed} test family"), test_drawing)):
        if count:
            objects = [drawing.choice(filled) for _ in range(count)]
            out[group] = (objects, [draw(o.shape, COLOURS[o.colour], gray, drawing) for o in objects])
    return out


def run_group(group: str, objects: list, concept_images: list, args, rng: random.Random, parts) -> dict[str, dict]:
    """Every row of one group: generate each object's contexts from noise and score them."""
    model, pipe, classifier, encoder, reader = parts
    results: dict[str, dict] = {}
    # the drawn groups draw their contexts apart, so that they do not depend on --n
    context_rng = random.Random(f"{args.seed} {group} contexts") if group.startswith("drawn") else rng
    scenes_of = [contexts(o, context_rng) for o in objects]
    scenes = [s for per in scenes_of for s in per]
    placeholder = [caption(s, placeholders={0: WORD}) for s in scenes]
    words = [caption(s) for s in scenes]
    with torch.no_grad():
        all_words = torch.cat([encoder(to_tensor(image)) for image in concept_images])  # (n, levels, width)
    repeat = len(scenes_of[0])
    per_scene = all_words.repeat_interleave(repeat, dim=0)
    rows = {"encoder w0": embed(model, placeholder, per_scene[:, :1]),
            "encoder, all words": embed(model, placeholder, per_scene),
            "text": embed(model, words, None)}
    if reader is not None:
        read = torch.stack([read_concept(encoder, reader, image).vectors for image in concept_images])
        rows["reader w0"] = embed(model, placeholder, read.repeat_interleave(repeat, dim=0))
    for name, embeddings in rows.items():
        if name not in args.rows.split(";"):
            continue
        results[f"{group} / {name}"] = score(classifier, generate(pipe, model, embeddings, args.seed + 1), scenes)
        print(f"{group} / {name}: {results[f'{group} / {name}']}", flush=True)
    # textual inversion on the first objects, with the encoder and text rows on the same images' prompts
    subset = scenes[:args.ti * repeat]
    if args.ti > 0 and not group.startswith("drawn"):
        learned = []
        for obj in objects[:args.ti]:
            prompt = f"a large {WORD} in the centre on a {CONCEPT_BACKGROUND} background"
            result = learn_concept(model, concept_image(obj), prompt, WORD, LearnOptions(), progress=False)
            learned.append(result.concept.vectors)
        vectors = torch.stack(learned).repeat_interleave(repeat, dim=0)
        small = {"textual inversion": embed(model, placeholder[:len(subset)], vectors),
                 "encoder w0": rows["encoder w0"][:len(subset)], "text": rows["text"][:len(subset)]}
        for name, embeddings in small.items():
            key = f"{group} (first {args.ti}) / {name}"
            results[key] = score(classifier, generate(pipe, model, embeddings, args.seed + 1), subset)
            print(f"{key}: {results[key]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None,
                        help="concept encoder .safetensors (default: the shipped one), or a training checkpoint.pt")
    parser.add_argument("--n", type=int, default=32, help="objects per group (seen, held-out)")
    parser.add_argument("--ti", type=int, default=4, help="objects per group also learned by textual inversion")
    parser.add_argument("--drawn", type=int, default=0,
                        help="also this many concept images drawn with PIL (spdinv.testing.hand_drawn_object), "
                             "not by the world renderer")
    parser.add_argument("--test-drawn", type=int, default=0,
                        help="also this many concept images drawn by benchmarks/concept_test_drawings.py")
    parser.add_argument("--shape-reader", default=None,
                        help="also the row 'reader w0': a shape reader .safetensors, or 'shipped'")
    parser.add_argument("--rows", default="encoder w0;encoder, all words;text;reader w0",
                        help="which rows to generate (';'-separated names; default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall = time.time()
    reader = None if args.shape_reader is None else load_shape_reader(
        None if args.shape_reader == "shipped" else args.shape_reader)

    model = load_model()
    pipe = stock_pipeline(model)
    classifier = load_classifier()
    started = time.perf_counter()
    if args.encoder is not None and args.encoder.endswith(".pt"):
        encoder = encoder_from_checkpoint(args.encoder)
    else:
        encoder = load_concept_encoder(args.encoder)
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    encoder.encode(concept_image(identities()[0]))
    results: dict[str, dict | float] = {"load seconds": round(loaded, 3),
                                        "encode seconds": round(time.perf_counter() - started, 3)}
    print(results, flush=True)
    rng = random.Random(args.seed)
    everything = identities()
    groups = {"seen": rng.sample([o for o in everything if not is_held_out(o)], args.n),
              "held-out": rng.sample([o for o in everything if is_held_out(o)], args.n)}
    images = {group: [concept_image(o) for o in objects] for group, objects in groups.items()}
    for group, (objects, drawings) in drawn_groups(args, everything).items():
        groups[group], images[group] = objects, drawings
    for group, objects in groups.items():
        if objects:
            results |= run_group(group, objects, images[group], args, rng, (model, pipe, classifier, encoder, reader))
    results["seconds"] = round(time.time() - wall)
    print(f"{results['seconds']} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()

"""`spdinv world export`: shapes-world edit pairs as a PIE-Bench-format folder plus ground truth.

Layout (as PIE-Bench's): mapping_file.json keyed by id, images under annotation_images/<category>/;
ours adds target_images/ and, per entry, `target_image_path`, `source_scene`, `target_scene`.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from PIL import Image

from ..masks import rle_encode
from ..outputs import staged_output, write_json
from .edits import CATEGORIES, EditPair, category_counts, make_edit

FOLDERS = {k: f"{k}_{v.replace(' ', '_')}" for k, v in CATEGORIES.items()}


def scene_dict(scene) -> dict:
    return {"background": scene.background, "background_kind": scene.background_kind,
            "objects": [dataclasses.asdict(o) for o in scene.objects]}


def make_pairs(n: int, seed: int) -> list[EditPair]:
    """n edit pairs in PIE-Bench's category mix, reproducible from the seed."""
    pairs = []
    for type_id, count in category_counts(n).items():
        rng = random.Random(f"{seed}-{type_id}")
        pairs.extend(make_edit(rng, type_id) for _ in range(count))
    return pairs


def entry(pair: EditPair, item_id: str) -> tuple[dict, Image.Image, Image.Image]:
    source, target = (Image.fromarray(a) for a in pair.images())
    folder = FOLDERS[pair.editing_type_id]
    record = {
        "image_path": f"{folder}/{item_id}.png",
        "target_image_path": f"{folder}/{item_id}.png",
        "original_prompt": pair.source_prompt,
        "editing_prompt": pair.editing_prompt,
        "editing_instruction": pair.instruction,
        "editing_type_id": pair.editing_type_id,
        "blended_word": pair.blended_word,
        "mask": rle_encode(pair.mask()),
        "source_scene": scene_dict(pair.source),
        "target_scene": scene_dict(pair.target),
    }
    return record, source, target


def export(out: Path, n: int, seed: int = 0) -> Path:
    """Write n edit pairs to `out` (all-or-nothing)."""
    with staged_output(out) as stage:
        mapping = {}
        for index, pair in enumerate(make_pairs(n, seed)):
            item_id = f"{int(pair.editing_type_id)}{index:011d}"
            record, source, target = entry(pair, item_id)
            for root, image in (("annotation_images", source), ("target_images", target)):
                path = stage / root / record["image_path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
            mapping[item_id] = record
        write_json(stage / "mapping_file.json", mapping)
    return Path(out)

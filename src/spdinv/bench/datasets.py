"""Reading PIE-Bench-format folders: the real PIE-Bench (user-supplied) and `spdinv world export`
output, which adds ground truth (the rendered target image and both scenes).

Layout: `mapping_file.json` keyed by id; `image_path` is relative to `annotation_images/` (as in
PIE-Bench) or, failing that, to the folder itself; `target_image_path` likewise under
`target_images/`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import SpdinvError
from ..images import open_image, require_regular_file
from ..masks import rle_decode, runs_past_frame

MAPPING_FILE = "mapping_file.json"
CATEGORY_NAMES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change colour", "7": "change material", "8": "change background", "9": "change style",
}
REQUIRED_KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")
_BRACKETED = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class GroundTruth:
    """What the world export knows exactly: the rendered target and both scenes (as dicts)."""

    target_image: Path
    source_scene: dict | None = None
    target_scene: dict | None = None


@dataclass(frozen=True)
class BenchItem:
    id: str
    image_path: Path
    source_prompt: str
    target_prompt: str
    editing_prompt: str  # with the [ ] markup
    edited_words: tuple[str, ...]
    instruction: str
    category: str  # editing_type_id, "0".."9"
    blend_source: str | None
    blend_target: str | None
    mask_rle: tuple[int, ...] = field(repr=False)
    image_size: tuple[int, int] = (0, 0)  # (width, height) from the image header
    ground_truth: GroundTruth | None = None
    mask_runs_clipped: int = 0  # runs of the mask that went past the frame (clipped, as the official decoder does)

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES.get(self.category, self.category)

    @property
    def blend_words(self) -> tuple[str, str] | None:
        if self.blend_source is None or self.blend_target is None:
            return None
        return self.blend_source, self.blend_target

    def mask(self) -> np.ndarray:
        """uint8 (H, W) at the image's size, 1 = edit region, border set to 1 (PIE-Bench's quirk)."""
        width, height = self.image_size
        return rle_decode(list(self.mask_rle), (height, width), official_border=True)

    def load_image(self) -> Image.Image:
        return _open_rgb(self.image_path)

    def load_target(self) -> Image.Image | None:
        return _open_rgb(self.ground_truth.target_image) if self.ground_truth else None


@dataclass
class BenchDataset:
    root: Path
    items: list[BenchItem]
    missing: list[str]  # ids skipped because their image is missing or unreadable

    def select(self, categories: list[str] | None = None, limit: int | None = None) -> "BenchDataset":
        """The items of the given categories (ids "0".."9" or names), then the first `limit`."""
        items = self.items
        if categories:
            wanted = {category_id(c) for c in categories}
            items = [item for item in items if item.category in wanted]
        if limit is not None:
            items = items[:limit]
        return BenchDataset(self.root, items, self.missing)

    @property
    def has_ground_truth(self) -> bool:
        """True for `spdinv world export` output (rendered targets), False for the real PIE-Bench."""
        return any(item.ground_truth is not None for item in self.items)

    def clipped_masks_note(self) -> str | None:
        """One line on the mask runs that went past the frame, or None when there were none."""
        clipped = [item for item in self.items if item.mask_runs_clipped]
        if not clipped:
            return None
        runs = sum(item.mask_runs_clipped for item in clipped)
        shown = ", ".join(item.id for item in clipped[:10]) + (", ..." if len(clipped) > 10 else "")
        return (f"{runs} mask run(s) in {len(clipped)} item(s) went past the frame and were clipped there, "
                f"as PIE-Bench's decoder does ({shown})")


def category_id(text: str) -> str:
    text = text.strip()
    if text in CATEGORY_NAMES:
        return text
    by_name = {name.replace(" ", "_"): key for key, name in CATEGORY_NAMES.items()}
    key = by_name.get(text.lower().replace(" ", "_").replace("color", "colour"))
    if key is None:
        valid = ", ".join(f"{k} ({v})" for k, v in CATEGORY_NAMES.items())
        raise SpdinvError(f"unknown category {text!r}; valid: {valid}")
    return key


def strip_markup(prompt: str) -> str:
    """The prompt without PIE-Bench's [ ] edit markup (brackets removed, words kept)."""
    return " ".join(prompt.replace("[", "").replace("]", "").split())


def bracketed_words(prompt: str) -> tuple[str, ...]:
    return tuple(" ".join(m.split()) for m in _BRACKETED.findall(prompt) if m.strip())


def split_blend_words(blended_word: str, item_id: str) -> tuple[str | None, str | None]:
    """PIE-Bench's blended_word "source target" (or "") as its two words."""
    words = (blended_word or "").split()
    if not words:
        return None, None
    if len(words) != 2:
        raise SpdinvError(f"item {item_id}: blended_word must be two words or empty, got {blended_word!r}")
    return words[0], words[1]


def load_dataset(root: str | Path) -> BenchDataset:
    """Read a PIE-Bench-format folder. Items whose image is missing are skipped and listed in
    `missing`; any other malformed entry is a one-line SpdinvError."""
    root = Path(root)
    mapping = _read_mapping(root)
    items, missing = [], []
    for item_id, entry in mapping.items():
        image_path = _resolve(root, "annotation_images", entry, "image_path", item_id)
        size = _image_size(image_path)
        if size is None:
            missing.append(str(item_id))
            continue
        items.append(_make_item(root, str(item_id), entry, image_path, size))
    return BenchDataset(root, items, missing)


def _read_mapping(root: Path) -> dict:
    path = root / MAPPING_FILE
    if not root.is_dir():
        raise SpdinvError(f"dataset folder not found: {root}")
    if not path.is_file():
        raise SpdinvError(f"no {MAPPING_FILE} in {root}: not a PIE-Bench-format folder")
    try:
        mapping = json.loads(path.read_text(), object_pairs_hook=_refuse_duplicate_ids)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpdinvError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise SpdinvError(f"{path} must map ids to entries")
    _check_ids(list(mapping), path)
    return mapping


def _refuse_duplicate_ids(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice (JSON keeps the last silently) is an error."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise SpdinvError(f"{MAPPING_FILE} gives id {key!r} twice (an entry would be lost)")
        seen[key] = value
    return seen


def file_stem(text: str) -> str:
    """`text` with every character a file name may not portably hold replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _check_ids(ids: list[str], path: Path) -> None:
    """Ids are one printable line (they key results.csv rows) and stay distinct as file names."""
    for item_id in ids:
        if not item_id.strip() or any(not c.isprintable() for c in item_id):
            raise SpdinvError(f"{path}: id {item_id!r} is empty or holds a newline or control character")
    stems: dict[str, str] = {}
    for item_id in ids:
        other = stems.setdefault(file_stem(item_id), item_id)
        if other != item_id:
            raise SpdinvError(f"{path}: ids {other!r} and {item_id!r} give one file name ({file_stem(item_id)}); "
                              "rename one")


def _make_item(root: Path, item_id: str, entry: dict, image_path: Path, size: tuple[int, int]) -> BenchItem:
    absent = [key for key in REQUIRED_KEYS if key not in entry]
    if absent:
        raise SpdinvError(f"item {item_id} in {MAPPING_FILE} lacks {', '.join(absent)}")
    for key in ("original_prompt", "editing_prompt", "editing_instruction", "blended_word"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise SpdinvError(f"item {item_id} in {MAPPING_FILE}: {key} must be text, got {entry[key]!r}")
    category = entry["editing_type_id"]
    if isinstance(category, bool) or not isinstance(category, (str, int)) or not str(category).strip():
        raise SpdinvError(f"item {item_id} in {MAPPING_FILE}: editing_type_id must be text or an integer, "
                          f"got {category!r}"[:200])
    mask_rle = entry["mask"]
    try:
        clipped = runs_past_frame(mask_rle, (size[1], size[0]))
    except SpdinvError as error:
        raise SpdinvError(f"item {item_id}: {error}") from None
    blend_source, blend_target = split_blend_words(entry.get("blended_word", ""), item_id)
    return BenchItem(
        id=item_id, image_path=image_path,
        source_prompt=strip_markup(entry["original_prompt"]), target_prompt=strip_markup(entry["editing_prompt"]),
        editing_prompt=entry["editing_prompt"], edited_words=bracketed_words(entry["editing_prompt"]),
        instruction=entry.get("editing_instruction", ""), category=str(entry["editing_type_id"]),
        blend_source=blend_source, blend_target=blend_target, mask_rle=tuple(mask_rle), image_size=size,
        ground_truth=_ground_truth(root, item_id, entry), mask_runs_clipped=clipped,
    )


def _ground_truth(root: Path, item_id: str, entry: dict) -> GroundTruth | None:
    if "target_image_path" not in entry:
        return None
    target = _resolve(root, "target_images", entry, "target_image_path", item_id)
    if _image_size(target) is None:
        return None
    return GroundTruth(target, entry.get("source_scene"), entry.get("target_scene"))


def _resolve(root: Path, subfolder: str, entry: dict, key: str, item_id: str) -> Path:
    relative = entry.get(key)
    if not isinstance(relative, str) or not relative:
        raise SpdinvError(f"item {item_id} in {MAPPING_FILE}: {key} must be a non-empty path")
    preferred = root / subfolder / relative
    return preferred if preferred.exists() or not (root / relative).exists() else root / relative


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the file is missing or not an image; a path
    that is not a regular file (a FIFO would block the read forever) is a one-line error."""
    require_regular_file(path, "dataset image")
    try:
        with Image.open(path) as image:
            return image.size
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None


def _open_rgb(path: Path) -> Image.Image:
    """8-bit RGB; damaged pixel data is a one-line SpdinvError (the runner records it in the row)."""
    return open_image(path)[0]

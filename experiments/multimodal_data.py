"""Image-caption pairs for the multimodal trainer: procedural line art or the user's folder.

The built-in set draws engraving-like scenes (shapes filled with hatching at an angle and a
density, at a grid position and a size) and writes the caption from the same parameters, in
reading order, so the caption is fully determined by the image. Train and validation are split
by scene: a validation scene's combination of objects never appears in training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from common.cli import UserError

SHAPES = ("circle", "square", "triangle", "diamond")
# degrees of the lines' normal from the vertical, in image coordinates (y down): at 135 the lines
# run x + y = const, up to the right ("rising"); at 45, x - y = const, down to the right
ANGLES = {"horizontal": 0.0, "vertical": 90.0, "rising": 135.0, "falling": 45.0}
DENSITIES = {"dense": 3.0, "sparse": 5.0}  # line spacing in pixels at 48x48
SIZES = {"small": 0.32, "large": 0.46}  # radius as a fraction of a grid cell
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# words in the longest synthetic caption per object ("a large circle with dense horizontal
# hatching at the top left"), and " and " between objects
WORDS_PER_OBJECT = 12

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    images: torch.Tensor  # (N, C, H, W) float in [0, 1]
    captions: list[str]


# -- tokenizer ----------------------------------------------------------------------------------


def words(caption: str) -> list[str]:
    return re.findall(r"[\w']+", caption.lower())  # letters of any script, digits


class Tokenizer:
    """Word-level: the most frequent training words up to ``vocab_size`` (specials included)."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.unk = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: list[str], vocab_size: int) -> Tokenizer:
        if vocab_size < len(SPECIALS) + 1:
            raise UserError(
                f"data.vocab_size={vocab_size} is too small: it must be at least "
                f"{len(SPECIALS) + 1} (4 special tokens and one word)"
            )
        counts = Counter(w for c in captions for w in words(c))
        # ties broken alphabetically so the vocabulary is deterministic
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(SPECIALS)]
        return cls([*SPECIALS, *ranked])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_len: int) -> list[int]:
        """bos + words + eos, cut to ``max_len`` and padded to it."""
        ids = [self.bos, *(self.stoi.get(w, self.unk) for w in words(caption)), self.eos]
        ids = ids[:max_len]
        return ids + [self.pad] * (max_len - len(ids))

    def encode_batch(self, captions: list[str], max_len: int) -> torch.Tensor:
        return torch.tensor([self.encode(c, max_len) for c in captions], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos:
                break
            if i not in (self.pad, self.bos):
                out.append(self.itos[i])
        return " ".join(out)

    def state_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_state_dict(cls, state: dict) -> Tokenizer:
        return cls(state["itos"])


# -- procedural line art ------------------------------------------------------------------------


Obj = tuple[int, int, int, int, int]  # cell, shape, angle, density, size (indices)


def describe(obj: Obj) -> str:
    cell, shape, angle, density, size = obj
    return (
        f"a {list(SIZES)[size]} {SHAPES[shape]} with {list(DENSITIES)[density]} "
        f"{list(ANGLES)[angle]} hatching at the {ROWS[cell // 3]} {COLS[cell % 3]}"
    )


def caption_of(scene: tuple[Obj, ...]) -> str:
    return " and ".join(describe(o) for o in scene)  # objects in reading order of their cells


def render(scene: tuple[Obj, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on white paper: an outline and hatching lines inside each shape."""
    img = np.ones((size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cell_px = size / 3
    scale = size / 48  # hatching spacing is given at 48x48
    for cell, shape, angle, density, size_i in scene:
        jitter = rng.uniform(-0.06, 0.06, size=2) * cell_px
        cx = (cell % 3 + 0.5) * cell_px + jitter[0]
        cy = (cell // 3 + 0.5) * cell_px + jitter[1]
        r = list(SIZES.values())[size_i] * cell_px
        dx, dy = (xx - cx) / r, (yy - cy) / r
        name = SHAPES[shape]
        if name == "circle":
            level = np.sqrt(dx**2 + dy**2)
        elif name == "square":
            level = np.maximum(abs(dx), abs(dy)) / 0.85
        elif name == "diamond":
            level = abs(dx) + abs(dy)
        else:  # triangle pointing up: the largest of three edge distances
            level = np.maximum(dy * 1.0, np.maximum(-dy * 0.5 + dx * 0.866, -dy * 0.5 - dx * 0.866))
            level = level / 0.5
        inside = level <= 1.0
        outline = inside & (level >= 1.0 - 1.2 / r)
        theta = np.deg2rad(list(ANGLES.values())[angle])
        spacing = list(DENSITIES.values())[density] * scale
        # one hatching lattice for the whole plate (as an engraver's ruling machine): the lines
        # are fixed by angle and density, so a reconstruction can get them right pixel by pixel
        proj = xx * np.sin(theta) - yy * np.cos(theta)
        lines = np.mod(proj, spacing) < max(1.0, scale)
        img[inside & lines] = 0.0
        img[outline] = 0.0
    return img


def distinct_scenes(max_objects: int) -> int:
    """How many different scenes the generator can draw with up to ``max_objects`` objects."""
    per_object = len(SHAPES) * len(ANGLES) * len(DENSITIES) * len(SIZES)
    return sum(math.comb(9, n) * per_object**n for n in range(1, max_objects + 1))


def _scenes(rng: np.random.Generator, count: int, max_objects: int, seen: set) -> list:
    out = []
    while len(out) < count:
        n = int(rng.integers(1, max_objects + 1))
        cells = sorted(rng.choice(9, size=n, replace=False).tolist())
        scene = tuple(
            (
                c,
                int(rng.integers(len(SHAPES))),
                int(rng.integers(len(ANGLES))),
                int(rng.integers(len(DENSITIES))),
                int(rng.integers(len(SIZES))),
            )
            for c in cells
        )
        if scene in seen:  # every scene once: validation combinations are new
            continue
        seen.add(scene)
        out.append(scene)
    return out


def synthetic_pairs(
    num_train: int, num_val: int, image_size: int, max_objects: int, seed: int
) -> tuple[PairSet, PairSet]:
    rng = np.random.default_rng(seed)
    seen: set = set()
    scenes = _scenes(rng, num_train + num_val, max_objects, seen)
    imgs = np.stack([render(s, image_size, rng) for s in scenes])[:, None]
    caps = [caption_of(s) for s in scenes]
    images = torch.from_numpy(imgs)
    return (
        PairSet(images[:num_train], caps[:num_train]),
        PairSet(images[num_train:], caps[num_train:]),
    )


# -- the user's folder --------------------------------------------------------------------------


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(image path, caption) rows from a CSV (header: image, caption) or a JSONL file."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"captions file {path} {what}")
    rows: list[tuple[str, str]] = []
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: Excel's BOM
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rows.append((str(rec["image"]), str(rec.get("caption") or "")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{path} line {n} is not a JSON object with 'image' and 'caption'"
                ) from None
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{path} needs a header row with the columns 'image' and 'caption'")
        rows = [(r["image"] or "", r["caption"] or "") for r in reader]
    if not rows:
        raise UserError(f"captions file {path} holds no image-caption pairs")
    return rows


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"image {path} listed in the captions file {what}")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"image {path} cannot be read ({type(exc).__name__})") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@dataclass
class DataPlan:
    """What a data set will hold, known before any image is decoded: for the memory check."""

    num_images: int
    longest_caption: int  # words
    channels: int
    rows: list[tuple[str, str]] = field(default_factory=list)  # folder: checked (image, caption)
    root: Path | None = None
    captions_file: Path | None = None


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def plan_folder(folder: str, captions_file: str | None, channels: int) -> DataPlan:
    """Read and check the captions file against the folder, decoding no image: every caption
    non-empty, every listed image present (all missing ones named at once), at least 2 pairs.
    Images in the folder that no caption names cannot train the captioner: one warning line
    with their count and the first few."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"data.folder {root} does not exist or is not a folder")
    if captions_file is None:
        found = [root / n for n in ("captions.csv", "captions.jsonl") if (root / n).is_file()]
        if not found:
            raise UserError(f"no captions.csv or captions.jsonl in {root} (set data.captions)")
        cap_path = found[0]
    else:
        cap_path = Path(captions_file).expanduser()
        cap_path = cap_path if cap_path.is_absolute() else root / cap_path
    rows = read_captions(cap_path)
    for name, caption in rows:
        if not words(caption):
            raise UserError(f"the caption of {name} in {cap_path} is empty")
    on_disk = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    missing = [name for name, _ in rows if not (root / name).exists()]
    captioned = {(root / name).resolve() for name, _ in rows}
    uncaptioned = [p for p in on_disk if p.resolve() not in captioned]
    if missing:
        hint = ""
        if on_disk and len(uncaptioned) == len(on_disk):
            hint = (f"; none of the {len(on_disk)} images in the folder is named in it (e.g. "
                    f"{uncaptioned[0].relative_to(root)}): do the names match?")  # fmt: skip
        raise UserError(f"{len(missing)} of the {len(rows)} images listed in {cap_path} do not "
                        f"exist in {root} ({_first(missing)}){hint}")  # fmt: skip
    if uncaptioned:
        names = [str(p.relative_to(root)) for p in uncaptioned]
        log.warning("%d of the %d images in %s have no caption in %s and are left out (%s)",
                    len(names), len(on_disk), root, cap_path.name, _first(names))  # fmt: skip
    if len(rows) < 2:
        raise UserError(f"{cap_path} has {len(rows)} pair; at least 2 are needed (train and val)")
    longest = max(len(words(c)) for _, c in rows)
    return DataPlan(len(rows), longest, channels, rows, root, cap_path)


def plan_pairs(cfg: DictConfig) -> DataPlan:
    dc = cfg.data
    if dc.source == "synthetic":
        longest = dc.max_objects * WORDS_PER_OBJECT + dc.max_objects - 1
        return DataPlan(dc.num_train + dc.num_val, longest, 1)
    if dc.folder is None:
        raise UserError("data.source=folder needs data.folder=<folder of images>")
    return plan_folder(dc.folder, dc.captions, dc.channels)


def folder_pairs(
    folder: str, captions_file: str | None, size: int, channels: int, val_fraction: float, seed: int,
    plan: DataPlan | None = None,
) -> tuple[PairSet, PairSet]:  # fmt: skip
    plan = plan or plan_folder(folder, captions_file, channels)
    rows, root = plan.rows, plan.root
    images = [load_image(root / name, size, channels) for name, _ in rows]
    captions = [caption for _, caption in rows]
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = min(len(rows) - 1, max(1, round(val_fraction * len(rows))))
    tensor = torch.from_numpy(np.stack(images))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (
        PairSet(tensor[train_idx], [captions[i] for i in train_idx]),
        PairSet(tensor[val_idx], [captions[i] for i in val_idx]),
    )


def load_pairs(cfg: DictConfig, seed: int, plan: DataPlan | None = None) -> tuple[PairSet, PairSet]:
    """The train and validation pairs; ``plan`` (from :func:`plan_pairs`) saves reading the
    captions file twice."""
    dc = cfg.data
    if dc.source == "synthetic":
        return synthetic_pairs(dc.num_train, dc.num_val, dc.image_size, dc.max_objects, seed)
    if dc.folder is None:
        raise UserError("data.source=folder needs data.folder=<folder of images>")
    return folder_pairs(
        dc.folder, dc.captions, dc.image_size, dc.channels, dc.val_fraction, seed, plan
    )

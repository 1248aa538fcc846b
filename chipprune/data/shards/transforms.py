"""Per-image decode and crop for images stored encoded (shards): ImageNet's standard training
augmentation (random-resized crop, horizontal flip) and evaluation transform (resize the
short side to size / 0.875, centre crop). Pure functions of the bytes and a seed, so a
sample comes out the same in any worker, rank or run."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults, as the ImageNet recipes use
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875  # 224 of 256
MODES = {1: "L", 3: "RGB"}


def decode(data: bytes, channels: int) -> Image.Image:
    """Encoded image bytes -> a loaded PIL image in the dataset's mode (L or RGB).

    Raises whatever PIL raises on a corrupt or truncated file (callers name the file)."""
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated file fails here, not in a later resize
    mode = MODES[channels]
    return img if img.mode == mode else img.convert(mode)


def random_resized_box(w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (ten tries at a random area and aspect, then
    the centre crop at the nearest allowed aspect) as a (left, top, right, bottom) box."""
    area = w * h
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = rng.randint(0, h - ch)
            left = rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < RRC_RATIO[0]:
        cw, ch = w, int(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        ch, cw = h, int(round(h * RRC_RATIO[1]))
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def center_box(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """The region of a w x h image that `Resize(size / 0.875)` then `CenterCrop(size)` keeps,
    in the image's own coordinates (resampled once from there, not twice)."""
    short = int(size / EVAL_CROP_FRACTION)
    rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    fx, fy = rw / w, rh / h
    return left / fx, top / fy, (left + size) / fx, (top + size) / fy


def to_chw(img: Image.Image) -> torch.Tensor:
    """PIL image -> (C, H, W) uint8 tensor."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def train_draw(w: int, h: int, seed: int, flip: bool) -> tuple[tuple[int, int, int, int], bool]:
    """The training view's random choices for a w x h image: the crop box and the mirror."""
    rng = random.Random(seed)
    box = random_resized_box(w, h, rng)
    return box, flip and rng.random() < 0.5


def train_view(img: Image.Image, size: int, seed: int, flip: bool) -> torch.Tensor:
    """Random-resized crop to size x size (bilinear, antialiased) and a coin-flip mirror."""
    box, mirrored = train_draw(img.width, img.height, seed, flip)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if mirrored:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_chw(out)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the encoded image's header, without decoding it."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# The same views on decoded (C, H, W) uint8 tensors, for batched decoding on the GPU
# (torchvision.io.decode_jpeg): crop, then resize with antialiasing, as torchvision's
# RandomResizedCrop / Resize + CenterCrop do on tensors. Equal to the PIL views up to the
# two libraries' resampling (tested within a few grey levels), not bit for bit.


def tensor_train_view(img: torch.Tensor, box: tuple[int, int, int, int], mirrored: bool,
                      size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    left, top, right, bottom = box
    out = TF.resize(img[:, top:bottom, left:right], [size, size], antialias=True)
    return out.flip(-1) if mirrored else out


def tensor_eval_view(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    out = TF.resize(img, [int(size / EVAL_CROP_FRACTION)], antialias=True)
    h, w = out.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return out[:, top : top + size, left : left + size]


def eval_view(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to size / 0.875, centre crop size x size."""
    box = center_box(img.width, img.height, size)
    return to_chw(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


def short_side_resized(img: Image.Image, side: int) -> Image.Image:
    """img with its short side at most `side` (aspect kept; smaller images as they are)."""
    w, h = img.size
    if min(w, h) <= side:
        return img
    nw, nh = (side, int(round(side * h / w))) if w <= h else (int(round(side * w / h)), side)
    return img.resize((nw, nh), Image.Resampling.BILINEAR)

"""Any-resolution preprocessing (LLaVA-NeXT style), vectorised with pillow + numpy.

For an image of ``W x H`` pixels:

1. choose the grid resolution ``(w, h)`` from ``pinpoints`` (each a multiple of
   ``crop_size``) that keeps the most of the image's pixels after a downscale that
   keeps the aspect ratio, and among equals wastes the least padding
   (:func:`select_best_resolution`);
2. resize the image into ``(w, h)`` keeping its aspect ratio and pad it, centred,
   with black (:func:`resize_and_pad`);
3. cut that into ``crop_size`` squares, row by row (:func:`split_crops`);
4. prepend the whole image resized (aspect ratio not kept) to ``crop_size`` as the
   *base* crop; optionally keep only the ``variance_k`` crops of highest grayscale
   standard deviation (:mod:`.selection`); the base crop is always kept.

Crops are uint8 ``[n, S, S, 3]`` until :func:`normalize` turns them into the
vision tower's input: float ``[n, 3, S, S]`` with CLIP's mean and std.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from ..argcheck import int_at_least, positive_int
from .image_io import ImageError, load_image
from .selection import crop_std, select_top_k

__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFAULT_GRID", "AnyResConfig", "ProcessedImage",
           "select_best_resolution", "resize_and_pad", "split_crops", "normalize",
           "process_image", "stack_images"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The reference grid in crops (width, height): 336 px crops give the pinpoints
# [[336, 336], [672, 672], [1008, 672], [672, 1008]].
DEFAULT_GRID = ((1, 1), (2, 2), (3, 2), (2, 3))


@dataclass(frozen=True)
class AnyResConfig:
    """``crop_size``: the tower's input side. ``pinpoints``: candidate resolutions
    ``(width, height)`` in pixels, multiples of ``crop_size`` (default: the reference
    grid). ``variance_k``: keep the base crop plus the ``k`` grid crops of highest
    grayscale std (None: every crop). ``max_crops``: most crops one image may give,
    the base included (None: whatever the pinpoints allow)."""

    crop_size: int = 336
    pinpoints: tuple[tuple[int, int], ...] = field(default=())
    variance_k: int | None = None
    max_crops: int | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        crop = positive_int("crop_size", self.crop_size)
        object.__setattr__(self, "crop_size", crop)
        points = self.pinpoints or tuple((gw * crop, gh * crop) for gw, gh in DEFAULT_GRID)
        try:
            points = tuple((int(w), int(h)) for w, h in points)
        except (TypeError, ValueError):
            raise ValueError(f"pinpoints must be (width, height) pairs, got "
                             f"{self.pinpoints!r}") from None
        for w, h in points:
            if w < crop or h < crop or w % crop or h % crop:
                raise ValueError(f"pinpoint ({w}, {h}) must be a positive multiple of "
                                 f"crop_size={crop} in both sides")
        object.__setattr__(self, "pinpoints", points)
        object.__setattr__(self, "variance_k",
                           int_at_least("variance_k", self.variance_k, 0, allow_none=True))
        object.__setattr__(self, "max_crops",
                           positive_int("max_crops", self.max_crops, allow_none=True))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")

    @property
    def largest_grid(self) -> int:
        """Grid crops of the largest pinpoint (the base crop not counted)."""
        return max((w // self.crop_size) * (h // self.crop_size) for w, h in self.pinpoints)

    @property
    def crops_limit(self) -> int:
        """Most crops (base included) an image can give under this configuration."""
        grid = self.largest_grid
        if self.variance_k is not None:
            grid = min(grid, self.variance_k)
        natural = 1 + grid
        return natural if self.max_crops is None else min(natural, self.max_crops)

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "pinpoints" else
                    list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> AnyResConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AnyResConfig fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "pinpoints" in data:
            data["pinpoints"] = tuple(tuple(p) for p in data["pinpoints"])
        for name in ("mean", "std"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


def select_best_resolution(width: int, height: int,
                           pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The pinpoint ``(w, h)`` that keeps the most image pixels once the image is
    scaled (aspect kept, never beyond its own pixel count) to fit; ties go to the
    one with the least padding, then to the earlier pinpoint."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_key = None, None
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (-kept, w * h - kept)
        if best_key is None or key < best_key:
            best, best_key = (w, h), key
    return best


def resize_and_pad(img: Image.Image, width: int, height: int,
                   fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``img`` scaled to fit ``width x height`` with its aspect ratio kept (the
    longer side fills; the other rounds up, at least 1 pixel) and centred on a
    ``fill`` canvas of exactly that size."""
    w0, h0 = img.size
    scale_w, scale_h = width / w0, height / h0
    if scale_w < scale_h:
        new_w, new_h = width, min(max(math.ceil(h0 * scale_w), 1), height)
    else:
        new_w, new_h = min(max(math.ceil(w0 * scale_h), 1), width), height
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def split_crops(array: np.ndarray, crop: int) -> np.ndarray:
    """``array`` ``[H, W, C]`` (H, W multiples of ``crop``) -> ``[H/crop * W/crop, crop,
    crop, C]``, row by row (left to right, then top to bottom)."""
    h, w, c = array.shape
    if h % crop or w % crop:
        raise ValueError(f"array of {h}x{w} pixels does not split into {crop}-pixel crops")
    rows, cols = h // crop, w // crop
    return (array.reshape(rows, crop, cols, crop, c).transpose(0, 2, 1, 3, 4)
            .reshape(rows * cols, crop, crop, c))


def normalize(crops: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 ``[..., S, S, 3]`` -> float32 ``[..., 3, S, S]``: ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).float().div_(255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.movedim(-1, -3).contiguous()


@dataclass
class ProcessedImage:
    """One image's kept crops. ``crops``: uint8 ``[n_kept, S, S, 3]``, base crop first;
    ``grid``: (columns, rows) of the any-res grid; ``kept``: indices of the kept grid
    crops (row-major, base excluded); ``stds``: every grid crop's grayscale std."""

    crops: np.ndarray
    grid: tuple[int, int]
    kept: np.ndarray
    stds: np.ndarray
    source: str = "image"

    @property
    def n_crops(self) -> int:
        return int(self.crops.shape[0])

    def pixels(self, config: AnyResConfig) -> torch.Tensor:
        return normalize(self.crops, config.mean, config.std)


def process_image(image, config: AnyResConfig) -> ProcessedImage:
    """``image``: a path or an RGB-convertible ``PIL.Image``. Errors name the file."""
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        img = load_image(source)
    elif isinstance(image, Image.Image):
        from .image_io import to_rgb

        source = "image"
        img = to_rgb(image)
    else:
        raise TypeError(f"image must be a path or a PIL.Image, got {type(image).__name__}")
    crop = config.crop_size
    width, height = select_best_resolution(img.width, img.height, config.pinpoints)
    padded = np.asarray(resize_and_pad(img, width, height))
    grid_crops = split_crops(padded, crop)
    base = np.asarray(img.resize((crop, crop), Image.Resampling.BICUBIC))[None]
    stds = crop_std(grid_crops)
    kept = (np.arange(len(grid_crops)) if config.variance_k is None
            else select_top_k(stds, config.variance_k))
    crops = np.concatenate([base, grid_crops[kept]], axis=0)
    if config.max_crops is not None and len(crops) > config.max_crops:
        raise ImageError(f"{source}: gives {len(crops)} crops (base + {len(kept)} of a "
                         f"{width // crop}x{height // crop} grid), more than max_crops="
                         f"{config.max_crops}; raise max_crops or set variance_k")
    return ProcessedImage(crops=crops, grid=(width // crop, height // crop), kept=kept,
                          stds=stds, source=source)


def stack_images(pixels: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row crops ``[n_i, 3, S, S]`` (None or ``n_i = 0``: no image) -> padded
    ``image_pixels`` ``[B, max n_i, 3, S, S]`` (zeros on padding) and
    ``image_crop_mask`` bool ``[B, max n_i]`` (True = a real crop, real crops first)."""
    if not pixels:
        raise ValueError("stack_images needs at least one row")
    shapes = {tuple(p.shape[1:]) for p in pixels if p is not None and p.shape[0]}
    if len(shapes) > 1:
        raise ValueError(f"crops of different sizes cannot share a batch: {sorted(shapes)}")
    if not shapes:
        raise ValueError("no row has an image")
    shape = shapes.pop()
    counts = [0 if p is None else int(p.shape[0]) for p in pixels]
    ref = next(p for p in pixels if p is not None and p.shape[0])
    out = ref.new_zeros((len(pixels), max(counts), *shape))
    mask = torch.zeros((len(pixels), max(counts)), dtype=torch.bool, device=ref.device)
    for i, (p, n) in enumerate(zip(pixels, counts, strict=True)):
        if n:
            out[i, :n] = p
            mask[i, :n] = True
    return out, mask

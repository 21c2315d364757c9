"""Pixels as uint8 tensors from decode to the training step: the fast form of open_clip's preprocessing.

open_clip's transforms crop and resize PIL images, then convert them to floats and normalise them in the loader
worker. Here an open_clip (torchvision) `Compose` is split at its `ToTensor`: the pixel steps before it run on
uint8 tensors (libjpeg-turbo decoding, torch's antialiased uint8 resampling kernels), batches travel as uint8 (a
quarter of the bytes), and `Normalize` runs where the batch is used, on its device, with the same float operations
as `ToTensor` + `Normalize` (so batches whose pixels come from PIL give the same floats bit for bit).

The random crop draws its parameters with torchvision's own `RandomResizedCrop.get_params`, from torch's RNG as the
PIL path does, so a sample seeded alike gets the same crop box on both paths; the tensor kernels resample that box
to within a level or two of PIL's (rounding), on a fraction of a percent of the pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from vlpretrain.formats import to_rgb

TensorOp = Callable[[torch.Tensor], torch.Tensor]


class Normalize:
    """uint8 image batches (or single images) -> `(x / 255 - mean) / std` in the training dtype, on their device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised floats of uint8 `images` [..., 3, H, W]; other dtypes (already normalised) are only cast."""
        if images.dtype != torch.uint8:
            return images.to(dtype)
        if images.device not in self._constants:
            self._constants[images.device] = (torch.tensor(self.mean, device=images.device).view(3, 1, 1),
                                              torch.tensor(self.std, device=images.device).view(3, 1, 1))
        mean, std = self._constants[images.device]
        # the operations of ToTensor + Normalize, in fp32 and in their order: the same floats as open_clip's
        # transform, then one rounding to the training dtype as `.to(dtype)` of those floats did
        out = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(mean).div_(std)
        return out if dtype == torch.float32 else out.to(dtype)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 RGB tensor [3, H, W] (a view of H x W x 3 memory, the layout resampling prefers);
    16-bit grey keeps its brightness (`formats.to_rgb`)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def decode_rgb(data: bytes, draft: int | None) -> torch.Tensor:
    """Image bytes -> uint8 RGB [3, H, W], the pixels PIL would give (`formats.to_rgb(Image.open(...))`).

    A JPEG at least twice `draft` px on both sides is decoded at a reduced DCT scale (PIL's draft, the largest
    1/2^k that stays >= draft, as `stages.decode` does); other YCbCr JPEGs go through libjpeg-turbo straight into a
    tensor (`torchvision.io.decode_jpeg`, measured faster than PIL and equal to it pixel for pixel); everything
    else (PNG, grayscale or CMYK JPEGs, files torchvision refuses) through PIL.
    """
    img = Image.open(io.BytesIO(data))  # reads the header only
    if img.format == "JPEG":
        w, h = img.size
        if draft and min(w // draft, h // draft) >= 2:
            img.draft("RGB", (draft, draft))
        elif img.mode == "RGB":  # YCbCr on disk
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                pass  # let PIL decide whether the file is usable and say why not
    return pil_to_uint8(img)


class _RandomResizedCrop:
    """torchvision's RandomResizedCrop on uint8 tensors: the same parameter draws, antialiased uint8 resampling."""

    def __init__(self, t: T.RandomResizedCrop):
        self.size, self.scale, self.ratio, self.interpolation = list(t.size), t.scale, t.ratio, t.interpolation

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        return F.resized_crop(img, i, j, h, w, self.size, interpolation=self.interpolation, antialias=True)


class _Resize:
    def __init__(self, t: T.Resize):
        self.size = [t.size] if isinstance(t.size, int) else list(t.size)
        self.interpolation, self.max_size = t.interpolation, t.max_size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return F.resize(img, self.size, interpolation=self.interpolation, max_size=self.max_size, antialias=True)


class _CenterCrop:
    def __init__(self, t: T.CenterCrop):
        self.size = list(t.size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return F.center_crop(img, self.size)


def _same(img: torch.Tensor) -> torch.Tensor:
    return img


def _tensor_op(t: object) -> TensorOp | None:
    """The uint8-tensor form of one PIL step of a Compose, or None when it has none here."""
    if isinstance(t, T.RandomResizedCrop):
        return _RandomResizedCrop(t)
    if isinstance(t, T.Resize):
        return _Resize(t)
    if isinstance(t, T.CenterCrop):
        return _CenterCrop(t)
    if type(t).__name__ == "MaybeConvertMode":  # open_clip's: converts PIL images only; decoding gives RGB
        return _same
    return None


class Chain:
    """Steps applied one after another (a plain class, so DataLoader workers started by spawn can pickle it)."""

    def __init__(self, *steps: Callable):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


@dataclass
class PixelPipeline:
    """A preprocessing `Compose` split at its ToTensor: the pixel steps (on PIL images and, when every step has a
    uint8-tensor form, on tensors) and the normalisation that followed them."""

    pil: Callable[[Image.Image], torch.Tensor]  # the Compose's own PIL steps, then uint8 [3, H, W]
    tensor: TensorOp | None  # the same steps on uint8 tensors from `decode_rgb`; None if a step has no tensor form
    normalize: Normalize


def split_transform(transform: Callable) -> PixelPipeline | None:
    """Split open_clip's / torchvision's `Compose([..., ToTensor(), Normalize(mean, std)])`; None for any other
    callable (it is then applied as it is, on PIL images)."""
    steps = list(getattr(transform, "transforms", None) or [])
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    if any(isinstance(t, T.ToTensor | T.Normalize) for t in steps[:-2]):
        return None
    norm = steps[-1]
    if len(norm.mean) != 3 or len(norm.std) != 3:
        return None
    pixel_steps = steps[:-2]
    ops = [_tensor_op(t) for t in pixel_steps]
    tensor = Chain(*ops) if all(op is not None for op in ops) else None
    return PixelPipeline(pil=Chain(*pixel_steps, pil_to_uint8), tensor=tensor,
                         normalize=Normalize(norm.mean, norm.std))

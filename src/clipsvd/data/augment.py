"""Training augmentation, batched: random resized crops (bicubic, antialiased) and flips.

The public CLIP-SVD code applies torchvision's RandomResizedCrop (scale 0.08–1, ratio 3/4–4/3,
bicubic) and a horizontal flip to every training image. Done image by image, that is a Python
loop of small kernels per step. Here the crop of every image of a batch is one linear map per
axis, so the whole batch is resampled by two batched matrix products on the device the images
are on:

    crop_i = R_i · image_i · C_iᵀ        R_i: size × H rows, C_i: size × W columns

R_i and C_i hold the weights of torch's antialiased bicubic resampling (Keys' cubic with
a = -0.5, as PIL; the kernel widened by the scale factor when shrinking, truncated at the
crop's edges and renormalised), so a crop equals
``torchvision.transforms.v2.functional.resized_crop(image, top, left, h, w, size, BICUBIC,
antialias=True)`` on the float image up to float rounding (tests/test_gpu_path.py compares
them). A flip reverses the order of C_i's rows. Crop boxes are drawn on the CPU from the run's
own generator, with torchvision's procedure (up to ten tries of area and log-ratio, then the
centre crop of the nearest allowed ratio), so nothing in a step waits for the device.

Images may have different sizes (the training views keep each source's aspect ratio): they
come zero-padded to a common (H, W) with their own height and width in ``sizes``; the
weights never reach past an image's own size, so the padding is never read.
"""
from __future__ import annotations

import math

import torch

RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], generator: torch.Generator,
               ratio: tuple[float, float] = RATIO) -> torch.Tensor:
    """(top, left, height, width) per image (B × 4, int64, CPU) for images of ``sizes``
    (B × 2: height, width), drawn as torchvision's RandomResizedCrop.get_params does."""
    sizes = sizes.to(torch.float64)
    height, width = sizes[:, 0:1], sizes[:, 1:2]
    draws = torch.rand(len(sizes), ATTEMPTS, 4, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * draws[..., 1])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    top = torch.floor(draws[..., 2] * (height - crop_h + 1))
    left = torch.floor(draws[..., 3] * (width - crop_w + 1))
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    boxes = torch.cat([t.gather(1, first) for t in (top, left, crop_h, crop_w)], dim=1)
    # No try fits: the whole image, cut to the nearest allowed aspect ratio, centred.
    source_ratio = width / height
    fallback_w = torch.where(source_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(source_ratio < ratio[0], torch.round(width / ratio[0]), height)
    fallback = torch.cat([torch.div(height - fallback_h, 2, rounding_mode="floor"),
                          torch.div(width - fallback_w, 2, rounding_mode="floor"),
                          fallback_h, fallback_w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback).to(torch.int64)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resampling_weights(start: torch.Tensor, length: torch.Tensor, size: int,
                       extent: int) -> torch.Tensor:
    """B × size × extent weights mapping ``extent`` input pixels to ``size`` outputs that cover
    input pixels [start, start + length) of each image (float32, on start's device)."""
    device = start.device
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / size
    shrink = scale.clamp(min=1.0)
    center = (torch.arange(size, device=device, dtype=torch.float32)[None, :, None] + 0.5) * scale
    offset = torch.arange(extent, device=device, dtype=torch.float32)[None, None, :] - start
    weights = _cubic((offset - center + 0.5) / shrink)
    weights = weights * ((offset >= 0) & (offset < length))
    return weights / weights.sum(dim=2, keepdim=True)


def random_resized_crops(images: torch.Tensor, sizes: torch.Tensor, indices: torch.Tensor,
                         size: int, scale: tuple[float, float], flip: bool,
                         generator: torch.Generator) -> torch.Tensor:
    """Crops of ``images[indices]`` resized to ``size`` (B × 3 × size × size float32 in [0, 1]).

    ``images``: N × 3 × H × W uint8 on any device; ``sizes``: N × 2 (height, width) on the CPU;
    ``indices``: B positions on the CPU. Random draws come from ``generator`` (CPU) only.
    """
    boxes = crop_boxes(sizes[indices], scale, generator)
    flips = (torch.rand(len(indices), generator=generator) < 0.5) if flip else None
    device = images.device
    with torch.autocast(device.type, enabled=False):  # the crops in float32 whatever the step
        boxes = boxes.to(device, non_blocking=True)
        rows = resampling_weights(boxes[:, 0], boxes[:, 2], size, images.shape[2])
        columns = resampling_weights(boxes[:, 1], boxes[:, 3], size, images.shape[3])
        if flips is not None:
            flips = flips.to(device, non_blocking=True)[:, None, None]
            columns = torch.where(flips, columns.flip(1), columns)
        batch = images[indices.to(device, non_blocking=True)].to(torch.float32)
        crops = rows[:, None] @ batch @ columns.transpose(1, 2)[:, None]
    return crops.div_(255.0).clamp_(0.0, 1.0)

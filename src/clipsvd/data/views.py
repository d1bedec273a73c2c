"""Training views: the train split's images near source resolution, for the training crops.

The public CLIP-SVD code applies RandomResizedCrop (scale 0.08–1, bicubic) to the original
image, so its crops see the whole field of view, non-square ones included, at the image's own
resolution. The store's ``images.npy`` holds what evaluation needs (resize, then the centre
crop or padding to the model's square); crops taken from it would never see what lies outside
that square and would upsample small crops from the model's size. So the store keeps, for every
image of the train split, a view after the same intensity scaling, with its aspect ratio kept,
scaled down (never up) so that its longer side is at most ``preprocessing.train_view`` pixels
(0: no views; training then crops the stored squares).

Views differ in shape, so they are one flat uint8 array (``train_views.npy``, memory-mapped;
view i is ``flat[offset : offset + 3·h·w]`` as 3 × h × w) and an index
(``train_views_index.npy``, int64 rows: store row, offset, height, width). Both are written
inside the store's temporary folder and appear with it (data.prepare, io.atomic_dir).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

VIEWS_FILE = "train_views.npy"
INDEX_FILE = "train_views_index.npy"
RESERVED_HEADER = 128  # bytes before the data of train_views.npy; filled in on close


def view_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) of an image's view: scaled down so its longer side is ``longest``,
    never up; the aspect ratio kept up to rounding."""
    side = max(height, width)
    if side <= longest:
        return height, width
    factor = longest / side
    return max(1, round(height * factor)), max(1, round(width * factor))


# The resampling of views: the one images.npy uses (MONAI Resized, bilinear, antialiased).
VIEW_RESIZE = {"mode": "bilinear", "anti_aliasing": True}


def resize_view(image, longest: int):
    """A channel-first 2D image (C, X, Y) with its longer side scaled down to ``longest``
    (unchanged when it is not longer)."""
    from monai.transforms import Resize

    shape = view_shape(int(image.shape[1]), int(image.shape[2]), longest)
    if shape == tuple(image.shape[1:]):
        return image
    return Resize(spatial_size=shape, **VIEW_RESIZE)(image)


def view_step(longest: int, resize_args: dict) -> dict:
    """The provenance record of the training views' transforms."""
    if resize_args != VIEW_RESIZE:
        raise AssertionError("training views and images.npy must resample alike")
    return {"transform": "training_view", "params": {
        "applies_to": "train split only", "longest_side": int(longest),
        "steps": "the intensity scaling above, then Resize to the aspect-kept shape with the "
                 "longer side at most longest_side (never enlarged), then to_uint8_rgb",
        **VIEW_RESIZE, "files": [VIEWS_FILE, INDEX_FILE]}}


class TrainingViewWriter:
    """Appends views (3 × h × w uint8) of store rows to the two files, streaming."""

    def __init__(self, directory: Path, longest: int):
        self.directory = Path(directory)
        self.longest = int(longest)
        self.entries: list[tuple[int, int, int, int]] = []
        self.offset = 0
        self.handle = open(self.directory / VIEWS_FILE, "wb")
        self.handle.write(b"\0" * RESERVED_HEADER)

    def append(self, store_row: int, view: np.ndarray) -> None:
        if view.dtype != np.uint8 or view.ndim != 3 or view.shape[0] != 3:
            raise AssertionError(f"a training view must be 3 × h × w uint8, got {view.shape}")
        self.handle.write(np.ascontiguousarray(view).tobytes())
        self.entries.append((int(store_row), self.offset, int(view.shape[1]), int(view.shape[2])))
        self.offset += view.size

    def close(self) -> None:
        self.handle.seek(0)
        header = {"descr": "|u1", "fortran_order": False, "shape": (self.offset,)}
        np.lib.format.write_array_header_1_0(self.handle, header)
        if self.handle.tell() != RESERVED_HEADER:
            raise AssertionError("the header of train_views.npy does not fill its reserved bytes")
        self.handle.close()
        index = np.asarray(self.entries, dtype=np.int64).reshape(-1, 4)
        np.save(self.directory / INDEX_FILE, index, allow_pickle=False)

    def summary(self) -> dict:
        """For provenance.json: how many views, their size on disk and their largest side."""
        heights = [e[2] for e in self.entries] or [0]
        widths = [e[3] for e in self.entries] or [0]
        return {"longest_side": self.longest, "n_views": len(self.entries),
                "bytes": int(self.offset), "files": [VIEWS_FILE, INDEX_FILE],
                "largest": [max(heights), max(widths)], "smallest": [min(heights), min(widths)],
                "of_split": "train", "resize": "aspect kept, longer side at most longest_side "
                "(never enlarged), after the intensity scaling of images.npy"}


@dataclass
class TrainingViews:
    """Read access to a store's training views (memory-mapped)."""

    path: Path
    flat: np.ndarray
    index: np.ndarray  # rows: store row, offset, height, width

    @classmethod
    def open(cls, store_dir: str | Path) -> "TrainingViews | None":
        """The views of a store, or None when it has none (``train_view: 0``)."""
        store_dir = Path(store_dir)
        if not (store_dir / VIEWS_FILE).is_file():
            return None
        try:
            flat = np.load(store_dir / VIEWS_FILE, mmap_mode="r")
            index = np.load(store_dir / INDEX_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{store_dir}: training views are unreadable ({exc}); run "
                            "`clipsvd prepare` again") from None
        sizes = 3 * index[:, 2] * index[:, 3] if len(index) else np.zeros(0, dtype=np.int64)
        if (flat.ndim != 1 or index.ndim != 2 or index.shape[1] != 4
                or (len(index) and int((index[:, 1] + sizes).max()) > len(flat))):
            raise DataError(f"{store_dir}: {VIEWS_FILE} and {INDEX_FILE} do not match; run "
                            "`clipsvd prepare` again")
        return cls(store_dir, flat, index)

    def stack(self, store_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of ``store_rows``: N × 3 × H × W uint8 (zero-padded to the largest) and
        their N × 2 (height, width)."""
        position = {int(row): i for i, row in enumerate(self.index[:, 0])}
        missing = [int(r) for r in store_rows if int(r) not in position]
        if missing:
            raise DataError(f"{self.path}: store row {missing[0]} has no training view (views "
                            "are kept for the train split only); run `clipsvd sample` and "
                            "`clipsvd prepare` again")
        entries = self.index[[position[int(r)] for r in store_rows]]
        sizes = torch.from_numpy(entries[:, 2:4].copy())
        height = int(entries[:, 2].max()) if len(entries) else 0
        width = int(entries[:, 3].max()) if len(entries) else 0
        images = np.zeros((len(entries), 3, height, width), dtype=np.uint8)
        for i, (_, offset, h, w) in enumerate(entries):
            images[i, :, :h, :w] = self.flat[offset:offset + 3 * h * w].reshape(3, h, w)
        return torch.from_numpy(images), sizes


# What training crops were cut from, by the file they were read from (train.json's
# ``crops_from``), in words for the log.
CROP_SOURCES = {
    VIEWS_FILE: "the training views (aspect kept, near source resolution)",
    "images.npy": "the stored squares of the model's size (the store keeps no training views: "
                  "preprocessing.train_view is 0)"}


def support_images(store, sample_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The images training crops are cut from, for the support set ``sample_ids`` of a
    :class:`~clipsvd.data.store.PreparedStore`: N × 3 × H × W uint8 (zero-padded), their
    N × 2 (height, width), and the store file they came from (a key of CROP_SOURCES)."""
    rows = store.rows(sample_ids)
    views = TrainingViews.open(store.path)
    if views is not None:
        images, sizes = views.stack(rows)
        return images, sizes, VIEWS_FILE
    images = torch.from_numpy(np.ascontiguousarray(store.images[rows]))
    sizes = torch.tensor([list(images.shape[2:])] * len(rows), dtype=torch.int64).reshape(-1, 2)
    return images, sizes, "images.npy"

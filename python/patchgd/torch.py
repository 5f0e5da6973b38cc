"""The patch stream as a PyTorch ``IterableDataset``, for a plain PyTorch training loop.

>>> from patchgd.torch import PatchDataset
>>> ds = PatchDataset("s3://bucket/slides/", patch=256, labels="s3://bucket/labels.csv")
>>> loader = torch.utils.data.DataLoader(ds, batch_size=None)    # doctest: +SKIP

Each item is one Arrow batch of patches (the patches of one grid row of one image, or of one
segment of it), as tensors: the pixels come straight from the Arrow buffer, not copied, where
every patch in the batch has pixels (see :func:`batch_tensors`).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import patchgd


def batch_tensors(batch: pa.RecordBatch) -> dict[str, Any]:
    """One patch batch as tensors.

    Returns a dict with ``pixels`` (uint8, N x C x H x W, a view of the Arrow buffer: read it,
    do not write it), ``label`` (int64, -1 where the image has none), ``row``, ``col``
    (int64), ``image_id`` (a list of str). Rows without pixels (below ``min_fraction``, or
    ``read`` other than pixels) are left out first; then the pixels are copied once, for the
    rows that remain.
    """
    pixels = batch.column("pixels")
    if pixels.null_count:
        batch = batch.filter(pc.is_valid(pixels))
        pixels = batch.column("pixels")
    n = batch.num_rows
    size = batch.column("size")
    channels = batch.column("channels")
    side = int(size[0].as_py()) if n else 0
    c = int(channels[0].as_py()) if n else 0
    out: dict[str, Any] = {
        "image_id": batch.column("image_id").to_pylist(),
        "label": torch.from_numpy(
            pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        ),
        "row": torch.from_numpy(batch.column("row").to_numpy().astype(np.int64)),
        "col": torch.from_numpy(batch.column("col").to_numpy().astype(np.int64)),
    }
    out["pixels"] = _pixels_view(pixels, n, side, c)
    return out


def _pixels_view(pixels: pa.Array, n: int, side: int, c: int) -> torch.Tensor:
    """The ``pixels`` column as N x C x H x W, without a copy when its values are contiguous."""
    if n == 0:
        return torch.empty((0, c, side, side), dtype=torch.uint8)
    per = side * side * c
    _, offsets_buf, data = pixels.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=len(pixels) + 1,
                            offset=pixels.offset * 4)
    start = int(offsets[0])
    if np.all(np.diff(offsets) == per):
        values = np.frombuffer(data, dtype=np.uint8, count=n * per, offset=start)
    else:  # not one size per patch: gather (a copy)
        values = np.frombuffer(b"".join(v.as_py() for v in pixels), dtype=np.uint8)
    with warnings.catch_warnings():
        # Arrow buffers are immutable: the tensor is a read-only view (torch warns about it).
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(values)
    return t.view(n, side, side, c).permute(0, 3, 1, 2)


class PatchDataset(torch.utils.data.IterableDataset):
    """The patches under ``url``, batch by batch, as tensors (:func:`batch_tensors`).

    Takes the arguments of :func:`patchgd.patches`. Use it with ``batch_size=None`` (the
    items are batches already) and ``num_workers=0``: patchgd decodes in parallel on its own
    threads, and a worker process each would read every image again. Images that cannot be
    read are reported as in :func:`patchgd.patches` (``failures``, the ``patchgd`` logger).
    """

    def __init__(self, url: str, patch: int = 256, **kwargs: Any) -> None:
        super().__init__()
        self.url = url
        self.patch = patch
        self.kwargs = kwargs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise patchgd.PatchgdError(
                f"PatchDataset('{self.url}'): use num_workers=0 (patchgd decodes in parallel "
                f"itself; {info.num_workers} workers would each read every image)"
            )
        for batch in patchgd.patches(self.url, self.patch, **self.kwargs):
            item = batch_tensors(batch)
            if item["pixels"].shape[0]:
                yield item

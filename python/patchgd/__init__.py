"""patchgd from Python: patch streams as Arrow, patchgd's SQL, runs and predictions.

The Rust library does the work (see docs/python.md in the repository); this package hands
its results over as Arrow without copying them:

>>> import patchgd
>>> reader = patchgd.patches("s3://bucket/slides/", patch=256, foreground="light:220",
...                          min_fraction=0.5)          # a pyarrow.RecordBatchReader
>>> for batch in reader: ...                             # doctest: +SKIP

Errors are raised as :class:`PatchgdError`, with the message the ``patchgd`` command prints.
"""

from __future__ import annotations

import json as _json
import sys as _sys
import tempfile as _tempfile
from typing import Any, Callable

# The extension links the libtorch that this torch ships (tch needs torch 2.11.0 exactly).
# Importing torch first loads that libtorch once; the extension then binds to the copy already
# in the process instead of looking for its own.
import torch as _torch  # noqa: F401  (imported for its shared libraries)

import pyarrow as _pa

from patchgd import _patchgd
from patchgd._patchgd import PatchgdError, Table

__version__ = _patchgd.__version__
__all__ = ["PatchgdError", "Table", "patches", "predict", "register", "run", "sql"]


def __getattr__(name: str) -> Any:
    # `patchgd.torch.PatchDataset` after a plain `import patchgd`, as users write it: the
    # submodule is imported on first use.
    if name == "torch":
        import importlib

        return importlib.import_module("patchgd.torch")
    raise AttributeError(f"module 'patchgd' has no attribute '{name}'")


def patches(
    url: str,
    patch: int = 256,
    *,
    stride: int | None = None,
    level: int = 0,
    channels: int = 3,
    labels: str | None = None,
    foreground: str = "220",
    min_fraction: float = 0.0,
    read: str = "pixels",
    workers: int | None = None,
    buffer_mib: int = 64,
    storage: dict[str, str] | None = None,
    failures: list[dict[str, str]] | None = None,
    strict: bool = False,
) -> _pa.RecordBatchReader:
    """Stream the patches of every image under ``url`` as Arrow record batches.

    One row per patch, the columns of the ``patches`` table (docs/sql.md): ``image_id``,
    ``label``, ``split``, ``row``, ``col``, ``x``, ``y``, ``level``, ``grid_rows``,
    ``grid_cols``, ``size``, ``channels``, ``mean``, ``std``, ``fg_fraction`` and ``pixels``
    (``size * size * channels`` bytes, row-major HWC; null for a patch below ``min_fraction``).
    Images are read as the pipelines read them: ``s3://``, ``gs://``, ``az://``, ``http(s)://``
    and local paths; PNG, JPEG, and tiled TIFF/SVS by byte range. Memory stays within about
    ``buffer_mib`` MiB of waiting batches plus the images being decoded.

    Args:
        url: a prefix (every image under it) or one object.
        patch: the patch side in pixels; ``stride`` defaults to it (no overlap).
        level: the pyramid level of a TIFF/SVS (0: full resolution).
        channels: 1 (grey) or 3 (RGB).
        labels: a CSV or Parquet table with ``image_id``, ``label``, ``split``.
        foreground: ``"220"`` or ``"light:220"`` (slides: glass is light), ``"dark:30"``.
        min_fraction: patches with less foreground keep their row but not their pixels.
        read: ``"pixels"``, ``"statistics"`` (no pixels kept) or ``"geometry"`` (headers only).
        workers: images or TIFF bands decoded in parallel (default: the cores).
        storage: object store settings, as ``patchgd --storage KEY=VALUE`` takes them.
        failures: a list that receives one dict (``image_id``, ``url``, ``stage``,
            ``message``) per image that could not be read; each is also logged to the
            ``patchgd`` logger.
        strict: end the stream with an error at the first image that cannot be read.

    Raises:
        PatchgdError: bad arguments, or a listing that fails (a missing bucket, say). Errors
            while streaming (``strict``) come through pyarrow, as its exception with
            patchgd's message.
    """
    stream = _patchgd.patches(
        url,
        patch,
        stride=stride,
        level=level,
        channels=channels,
        labels=labels,
        foreground=foreground,
        min_fraction=min_fraction,
        read=read,
        workers=workers,
        buffer_mib=buffer_mib,
        storage=storage,
        failures=failures,
        strict=strict,
    )
    return _pa.RecordBatchReader.from_stream(stream)


def sql(
    query: str,
    *,
    images: str | None = None,
    labels: str | None = None,
    patch: int = 256,
    level: int = 0,
    channels: int = 3,
    run: str | None = None,
    storage: dict[str, str] | None = None,
    partitions: int | None = None,
    failures: list[dict[str, str]] | None = None,
) -> _pa.Table:
    """Run one read-only query, as ``patchgd sql`` does, and return the result as a table.

    ``images`` registers the tables ``images`` and ``patches`` (with ``patch``, ``level``,
    ``channels``); ``run`` (a run's output directory) registers ``metrics``, ``predictions``,
    ``errors``, ``heatmaps`` and ``latents``. The table functions and UDFs of docs/sql.md are
    there too. Images that could not be read are left out of the result and reported as in
    :func:`patches`.
    """
    stream = _patchgd.sql(
        query,
        images=images,
        labels=labels,
        patch=patch,
        level=level,
        channels=channels,
        run=run,
        storage=storage,
        partitions=partitions,
        failures=failures,
    )
    return _pa.RecordBatchReader.from_stream(stream).read_all()


def register(
    ctx: object,
    *,
    images: str | None = None,
    labels: str | None = None,
    patch: int = 256,
    level: int = 0,
    channels: int = 3,
    run: str | None = None,
    storage: dict[str, str] | None = None,
) -> dict[str, Table]:
    """Register patchgd's tables in a datafusion-python ``SessionContext`` (DataFusion 55).

    ``images`` adds ``images`` and ``patches``; ``run`` adds ``metrics``, ``predictions``,
    ``errors``, ``heatmaps`` and ``latents`` (those the run has written). They are patchgd's
    own providers, handed over through datafusion-ffi: a filter on ``image_id`` still opens
    only that image (``EXPLAIN ANALYZE`` shows ``images_opened``), and a projection without ``pixels`` still
    decodes no more than it must. The UDFs (``vector_norm``, ``cosine_similarity``,
    ``byte_length``) and table functions (``images(url)``, ``patches(url, patch)``,
    ``latents(run)``) are registered too. Returns the tables by name (the table functions as
    ``"patches()"`` and so on); ``take_failures()`` on any of them lists the images its scans
    could not read.
    """
    import datafusion

    tables = {t.name: t for t in _patchgd.tables(images=images, labels=labels, patch=patch,
                                                 level=level, channels=channels, run=run,
                                                 storage=storage)}
    for name, table in tables.items():
        ctx.register_table(name, table)
    scalars, table_functions = _patchgd.functions(storage=storage)
    for f in scalars:
        ctx.register_udf(datafusion.ScalarUDF.from_pycapsule(f))
    for f in table_functions:
        ctx.register_udtf(datafusion.TableFunction(f.name, f, ctx))
        tables[f"{f.name}()"] = f
    return tables


def _override(key: str, value: Any) -> str:
    """One ``--set KEY=VALUE``; the value in YAML (JSON is YAML)."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={_json.dumps(value)}"


class _Progress:
    """Progress as a notebook shows it: a tqdm bar per epoch when tqdm is installed, the
    run's notes (one line per epoch with its metrics) printed."""

    def __init__(self) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm
        self.bar = None

    def __call__(self, event: str, value: Any) -> None:
        if event == "epoch" and self.tqdm is not None:
            self.close()
            label, images = value
            self.bar = self.tqdm(total=images, desc=label, unit="image", leave=False)
        elif event == "images" and self.bar is not None:
            self.bar.update(value - self.bar.n)
        elif event == "note":
            if self.bar is not None:
                self.bar.write(value)
            else:
                print(value, file=_sys.stderr)
        elif event == "finished":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(progress: bool | Callable[[str, Any], None]):
    if progress is True:
        return _Progress()
    if progress is False or progress is None:
        return None
    return progress


def run(
    pipeline: str,
    overrides: dict[str, Any] | None = None,
    *,
    fresh: bool = False,
    progress: bool | Callable[[str, Any], None] = True,
) -> dict[str, Any]:
    """Run a pipeline file to the end, as ``patchgd run`` does, and return its summary.

    ``overrides`` are the command line's ``--set KEY=VALUE`` (``{"train.epochs": 1}``). A run
    resumes from its newest checkpoint unless ``fresh``. ``progress``: a tqdm bar per epoch
    (when tqdm is installed) and the epoch lines; ``False`` for none, or a callable
    ``progress(event, value)`` that receives ``note`` (a line), ``epoch`` ((label, images)),
    ``images`` (images done in the epoch), ``metrics`` (the epoch's row as JSON) and
    ``finished``.

    Ctrl-C stops the run after the optimizer step it is in, writes a checkpoint there, and
    raises ``KeyboardInterrupt``; running again resumes from that step. Returns the summary
    (``summary.json``) as a dict. Raises :class:`PatchgdError` for a bad pipeline file or key,
    unusable data, or an output that cannot be written.
    """
    sets = [_override(k, v) for k, v in (overrides or {}).items()]
    text = _patchgd.run(str(pipeline), sets, fresh=fresh, progress=_progress(progress))
    return _json.loads(text)


def predict(
    model: str,
    images: str,
    output: str | None = None,
    *,
    labels: str | None = None,
    heatmaps: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    storage: dict[str, str] | None = None,
    progress: bool | Callable[[str, Any], None] = True,
) -> _pa.Table:
    """Predict every image under ``images`` with a trained run, as ``patchgd predict`` does.

    ``model`` is a run's output (or one of its checkpoints); the results are written under
    ``output`` (a new temporary directory when not given): ``predictions.parquet``,
    ``errors.parquet``, ``summary.json`` and, with ``heatmaps``, ``heatmaps.parquet`` and a
    picture per image (docs/inference.md). Returns the predictions as a table; its schema
    metadata holds the summary as JSON under ``patchgd.summary``. Images that cannot be read
    are in ``errors.parquet`` and counted in the summary, never left out silently.
    """
    if output is None:
        output = _tempfile.mkdtemp(prefix="patchgd-predict-")
    text = _patchgd.predict_images(str(model), str(images), str(output), labels=labels,
                                   heatmaps=heatmaps, batch_size=batch_size, device=device,
                                   storage=storage, progress=_progress(progress))
    table = sql("SELECT * FROM predictions", run=str(output), storage=storage)
    metadata = dict(table.schema.metadata or {})
    metadata[b"patchgd.summary"] = text.encode()
    return table.replace_schema_metadata(metadata)

"""Type hints for the Rust extension (the public API is patchgd/__init__.py)."""

from typing import Any

__version__: str

class PatchgdError(Exception):
    """An error patchgd reports: it names the object, key or file, and what was expected."""

class ArrowStream:
    """An Arrow C stream, read once (``__arrow_c_stream__``)."""

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any: ...

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
) -> ArrowStream: ...
def sql(
    query_text: str,
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
) -> ArrowStream: ...
def run(
    pipeline: str,
    overrides: list[str] = ...,
    *,
    fresh: bool = False,
    progress: Any = None,
) -> str: ...
def predict_images(
    model: str,
    images: str,
    output: str,
    *,
    labels: str | None = None,
    heatmaps: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    storage: dict[str, str] | None = None,
    progress: Any = None,
) -> str: ...

class Table:
    """One of patchgd's tables, for ``datafusion.SessionContext.register_table``."""

    @property
    def name(self) -> str: ...
    def take_failures(self, into: list[dict[str, str]] | None = None) -> int: ...
    def __datafusion_table_provider__(self, session: Any = None) -> Any: ...

def tables(
    *,
    images: str | None = None,
    labels: str | None = None,
    patch: int = 256,
    level: int = 0,
    channels: int = 3,
    run: str | None = None,
    storage: dict[str, str] | None = None,
) -> list[Table]: ...

"""patchgd.patches and patchgd.sql against the command line, on real files and a real S3 server."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import patchgd
from conftest import ROOT, run_cli

KEY = ["image_id", "row", "col"]


def sorted_table(t: pa.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in KEY])


def cli_patches(exe, images, patch, out, columns="*", channels=3):
    """`patchgd sql` over the same images, written as Parquet."""
    r = run_cli(exe, "sql", "--images", str(images), "--patch", str(patch), "--channels",
                str(channels), "--format", "parquet", "--output", str(out),
                f"SELECT {columns} FROM patches")
    assert r.returncode == 0, r.stderr
    return pq.read_table(out)


def test_patches_are_the_clis_rows_pixels_included(patchgd_bin, image_dir, tmp_path):
    reader = patchgd.patches(str(image_dir), 64)
    assert isinstance(reader, pa.RecordBatchReader)
    ours = sorted_table(reader.read_all())
    theirs = sorted_table(cli_patches(patchgd_bin, image_dir, 64, tmp_path / "p.parquet"))
    assert ours.num_rows > 100  # 5 small images and a 2220 x 2967 slide in 64 px patches
    assert ours.column_names == theirs.column_names
    assert set(pc.unique(ours["image_id"]).to_pylist()) == {
        "img0", "img1", "img2", "img3", "img4", "slide"}
    for name in ours.column_names:
        assert ours[name].equals(theirs[name].cast(ours.schema.field(name).type)), name


def test_grey_statistics_only_and_geometry_read_less(image_dir):
    stats = patchgd.patches(str(image_dir), 128, channels=1, read="statistics").read_all()
    assert stats["pixels"].null_count == stats.num_rows
    assert stats["mean"].null_count == 0
    assert set(stats["channels"].to_pylist()) == {1}
    geometry = patchgd.patches(str(image_dir), 128, read="geometry").read_all()
    assert geometry["mean"].null_count == geometry.num_rows
    assert sorted_table(geometry).select(KEY).equals(sorted_table(stats).select(KEY))


def test_min_fraction_keeps_rows_and_drops_background_pixels(image_dir):
    # The slide's glass is light: with a threshold of 220, some patches are mostly background.
    t = patchgd.patches(str(image_dir / "slide.svs"), 256, foreground="light:220",
                        min_fraction=0.5).read_all()
    kept = pc.is_valid(t["pixels"])
    fg = t["fg_fraction"]
    assert 0 < pc.sum(kept).as_py() < t.num_rows
    assert pc.all(pc.equal(kept, pc.greater_equal(fg, 0.5))).as_py()


def test_sql_gives_the_clis_answer(patchgd_bin, image_dir, tmp_path):
    query = ("SELECT image_id, count(*) AS n, avg(fg_fraction) AS fg FROM patches "
             "GROUP BY image_id ORDER BY image_id")
    ours = patchgd.sql(query, images=str(image_dir), patch=64)
    r = run_cli(patchgd_bin, "sql", "--images", str(image_dir), "--patch", "64", "--format",
                "parquet", "--output", str(tmp_path / "q.parquet"), query)
    assert r.returncode == 0, r.stderr
    assert ours.equals(pq.read_table(tmp_path / "q.parquet"))


def test_a_corrupt_tiff_is_reported_and_the_rest_is_read(image_dir, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((image_dir / "img0.png").read_bytes())
    # A TIFF header that points at a directory past the end of the file.
    (folder / "broken.tif").write_bytes(b"II*\x00\xff\xff\x00\x00" + b"\x00" * 64)
    failures: list[dict] = []
    with caplog.at_level("WARNING", logger="patchgd"):
        t = patchgd.patches(str(folder), 32, failures=failures).read_all()
    assert set(t["image_id"].to_pylist()) == {"good"}
    assert [f["image_id"] for f in failures] == ["broken"]
    assert failures[0]["url"].endswith("broken.tif") and failures[0]["message"]
    assert "broken" in caplog.text
    # strict: the stream ends with an error that names the image.
    with pytest.raises(Exception, match="broken"):
        patchgd.patches(str(folder), 32, strict=True).read_all()


def test_bad_arguments_and_a_missing_bucket_raise_patchgd_errors(s3):
    _, options = s3
    with pytest.raises(patchgd.PatchgdError, match="no-such-bucket"):
        patchgd.patches("s3://no-such-bucket/slides/", 64, storage=options)
    with pytest.raises(patchgd.PatchgdError, match="dark:N"):
        patchgd.patches("s3://x/", 64, foreground="dusk", storage=options)
    with pytest.raises(patchgd.PatchgdError, match="'geometry'"):
        patchgd.patches("s3://x/", 64, read="everything", storage=options)
    with pytest.raises(patchgd.PatchgdError, match="not_a_setting"):
        patchgd.patches("s3://x/", 64, storage={"not_a_setting": "1"})


def test_patches_from_s3_equal_the_same_files_on_disk(s3, image_dir):
    client, options = s3
    client.create_bucket(Bucket="slides", ACL="public-read-write")
    for path in sorted(image_dir.iterdir()):
        client.upload_file(str(path), "slides", f"set/{path.name}")
    remote = sorted_table(patchgd.patches("s3://slides/set/", 128, storage=options).read_all())
    local = sorted_table(patchgd.patches(str(image_dir), 128).read_all())
    assert remote.drop_columns(["split", "label"]).equals(
        local.drop_columns(["split", "label"]))


def test_a_stream_is_read_once_and_other_arrow_readers_take_it(image_dir):
    stream = patchgd._patchgd.patches(str(image_dir / "img0.png"), 32)
    table = pa.RecordBatchReader.from_stream(stream).read_all()
    assert table.num_rows == 3 * 5  # 96 x 160 in 32 px patches
    with pytest.raises(patchgd.PatchgdError, match="already read"):
        pa.RecordBatchReader.from_stream(stream)


def test_reading_a_32k_tiff_grows_memory_within_10_percent_of_the_clis_scan(patchgd_bin,
                                                                            tmp_path,
                                                                            monkeypatch):
    """The Python reader keeps the source stage's memory bound: while it reads a 32k px tiled
    TIFF, its process grows by no more than 10% over what `patchgd inspect --scan` grows by.
    (What each process holds before the scan differs: Python with torch and pyarrow imported
    takes about 150 MiB more than the command line; docs/python.md.)"""
    import statistics
    import sys

    sys.path.insert(0, str(ROOT / "python" / "bench"))
    import reader as bench

    # Both processes get the same cap on glibc's malloc arenas. Left to glibc (8 per core),
    # how many arenas a process ends up with depends on which thread first allocated when, and
    # that moved either process's growth by 15 MiB from one run to the next: more than the
    # 10% asked. docs/python.md has the figures with and without the cap.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    path = bench.synth_tiff(patchgd_bin, 32768, tmp_path)
    growth_cli, growth_py = [], []
    for _ in range(3):  # interleaved; the median of each
        n_cli, _, peak, before = bench.cli(patchgd_bin, path, 256, "dark:32", 2, 128)
        growth_cli.append(peak - before)
        n_py, _, peak, before = bench.child(bench.PATCHGD_READ, path, 256, "dark:32", 2, 128)
        growth_py.append(peak - before)
        assert n_py == n_cli == 128 * 128
    cli, py = statistics.median(growth_cli), statistics.median(growth_py)
    # 10%, plus what remains of the measurement's spread with the cap (single runs 28-41 MiB).
    spread = 8 << 20
    assert py <= 1.10 * cli + spread, ([g >> 20 for g in growth_py], [g >> 20 for g in growth_cli])

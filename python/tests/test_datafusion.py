"""patchgd's tables inside datafusion-python 55, through datafusion-ffi."""

from __future__ import annotations

import re

import datafusion
import pytest
import pyarrow.parquet as pq

import patchgd
from conftest import run_cli

QUERY = ("SELECT image_id, count(*) AS n, sum(size) AS px, min(x) AS x0, max(y) AS y1 "
         "FROM patches GROUP BY image_id ORDER BY image_id")


def test_queries_give_the_clis_answer(patchgd_bin, image_dir, tmp_path):
    ctx = datafusion.SessionContext()
    tables = patchgd.register(ctx, images=str(image_dir), patch=64)
    assert {"images", "patches"} <= set(tables)
    ours = ctx.sql(QUERY).to_arrow_table()
    r = run_cli(patchgd_bin, "sql", "--images", str(image_dir), "--patch", "64", "--format",
                "parquet", "--output", str(tmp_path / "q.parquet"), QUERY)
    assert r.returncode == 0, r.stderr
    theirs = pq.read_table(tmp_path / "q.parquet")
    assert ours.num_rows == 6
    assert ours.equals(theirs.cast(ours.schema))
    images = ctx.sql("SELECT image_id, width, height FROM images ORDER BY image_id")
    assert images.to_arrow_table()["width"].to_pylist()[-1] == 2220  # the slide


def explain_counters(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(images_(?:opened|decoded|failed))=(\d+)", text)}


def test_a_filter_on_image_id_opens_one_image_as_in_the_cli(patchgd_bin, image_dir):
    ctx = datafusion.SessionContext()
    patchgd.register(ctx, images=str(image_dir), patch=64)
    query = "SELECT count(*), avg(mean) FROM patches WHERE image_id = 'img2'"
    plan = ctx.sql(f"EXPLAIN ANALYZE {query}").to_arrow_table()
    ours = explain_counters(" ".join(plan.column(1).to_pylist()))
    r = run_cli(patchgd_bin, "sql", "--images", str(image_dir), "--patch", "64",
                f"EXPLAIN ANALYZE {query}")
    assert r.returncode == 0, r.stderr
    theirs = explain_counters(r.stdout)
    assert ours["images_opened"] == 1 and ours["images_decoded"] == 1, ours
    assert ours == theirs


def test_run_tables_and_failures(image_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes((image_dir / "img0.png").read_bytes())
    (folder / "broken.tif").write_bytes(b"II*\x00\xff\xff\x00\x00" + b"\x00" * 64)
    ctx = datafusion.SessionContext()
    tables = patchgd.register(ctx, images=str(folder), patch=32)
    n = ctx.sql("SELECT count(*) AS n FROM patches").to_arrow_table()["n"][0].as_py()
    assert n == 15  # the good image's 3 x 5 patches; the broken one is reported
    failures: list[dict] = []
    assert tables["patches"].take_failures(failures) == 1
    assert failures[0]["image_id"] == "broken"


def test_udfs_and_table_functions_work_in_datafusion_python(image_dir):
    ctx = datafusion.SessionContext()
    registered = patchgd.register(ctx)
    assert {"images()", "patches()", "latents()"} <= set(registered)
    norm = ctx.sql("SELECT vector_norm(make_array(3.0, 4.0)) AS v").to_arrow_table()
    assert norm["v"].to_pylist() == [5.0]
    query = (f"SELECT count(*) AS n, max(byte_length(pixels)) AS b "
             f"FROM patches('{image_dir / 'img0.png'}', 32)")
    t = ctx.sql(query).to_arrow_table()
    assert t["n"].to_pylist() == [15] and t["b"].to_pylist() == [32 * 32 * 3]
    assert patchgd.sql(query)["n"].to_pylist() == [15]


def test_register_and_sql_check_their_arguments_as_patches_does(image_dir):
    ctx = datafusion.SessionContext()
    with pytest.raises(patchgd.PatchgdError, match="channels=2: expected 1"):
        patchgd.register(ctx, images=str(image_dir), channels=2)
    with pytest.raises(patchgd.PatchgdError, match="at least 1 pixel"):
        patchgd.sql("SELECT count(*) FROM patches", images=str(image_dir), patch=0)

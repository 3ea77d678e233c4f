"""`python -m tfcdisc.inspect`: what is in this file, and clear failures."""

import json
import subprocess
import sys

import numpy as np

from conftest import doc, write
from tfcdisc.catalogue import report as inspect_lib


def test_report_on_a_catalogue(catalogue):
    folder, summary = catalogue
    report = inspect_lib.inspect_file(str(folder / "train.bson"),
                                      category_names=str(folder / "category_names.csv"))
    assert list(report)[1:3] == ["products", "images"]
    assert report["products"] == 240
    assert sum(int(k) * v for k, v in report["images_per_product"].items()) == report["images"]
    assert report["categories"]["count"] == 12
    largest = report["categories"]["largest"]
    assert largest[0]["products"] >= largest[-1]["products"]
    assert len(largest[0]["names"]) == 3 and report["categories"]["not_in_taxonomy"] == []
    assert report["corrupt"] == {"bad_documents": 0, "skipped_bytes": 0, "problems": []}
    assert report["product_ids_increasing"] is True
    test_report = inspect_lib.inspect_file(str(folder / "test.bson"))
    assert test_report["products"] == 60 and "categories" not in test_report
    assert test_report["images"] + report["images"] == summary["images"]


def test_cli_json_and_corrupt_exit_status(tmp_path):
    d = [doc(i, n_images=1 + i % 3) for i in range(1, 6)]
    good = write(tmp_path, *d)
    out = subprocess.run([sys.executable, "-m", "tfcdisc.inspect", "--bson", good],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["products"] == 5 and report["images"] == 2 + 3 + 1 + 2 + 3
    assert report["product_id_range"] == [1, 5]

    truncated = write(tmp_path, *d[:3], d[3][:-7], name="truncated.bson")
    out = subprocess.run([sys.executable, "-m", "tfcdisc.inspect", "--bson", truncated],
                         capture_output=True, text=True, timeout=300)
    offset = sum(map(len, d[:3]))
    assert out.returncode == 2 and out.stdout == ""
    assert f"truncated.bson: byte offset {offset}" in out.stderr
    assert "Traceback" not in out.stderr

    out = subprocess.run([sys.executable, "-m", "tfcdisc.inspect", "--bson", truncated,
                          "--errors=skip"], capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["products"] == 3
    assert report["corrupt"]["skipped_bytes"] == len(d[3]) - 7
    assert report["corrupt"]["problems"][0]["offset"] == offset


def test_histogram_counts_every_product():
    from tfcdisc.catalogue import index as index_lib
    idx = index_lib.OffsetIndex("x", np.arange(4, dtype=np.int64) * 10,
                                np.full(4, 10, np.int32), np.arange(4, dtype=np.int64),
                                np.array([5, 5, 6, 7]), np.array([1, 4, 4, 2], np.int16),
                                True, {"size": 40})
    report = inspect_lib.summarize(idx)
    assert report["images_per_product"] == {"1": 1, "2": 1, "4": 2}
    assert report["categories"]["largest"][0] == {"category_id": 5, "products": 2}

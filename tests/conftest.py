"""Shared fixtures: small synthetic catalogues made by the tests themselves."""

import os
import pathlib

import bson
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_CATEGORY_NAMES = REPO.parent / "shared" / "data" / "category_names.csv"


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory):
    """A small Kaggle-layout folder: 240 train and 60 test products in 12 categories."""
    from tfcdisc import synth
    out = tmp_path_factory.mktemp("catalogue")
    summary = synth.generate(str(out), 240, 60, num_categories=12, seed=7, workers=1)
    return out, summary


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Index files that cannot sit beside a BSON go to a per-test cache."""
    monkeypatch.setenv("TFCDISC_CACHE", str(tmp_path / "cache"))


def doc(pid=1, cid=1000000100, n_images=1, **extra) -> bytes:
    """One BSON product document; ``extra`` overrides or adds fields (None removes one)."""
    fields = {"_id": pid, "imgs": [{"picture": b"\xff\xd8jpeg%d-%d\xff\xd9" % (pid, i)}
                                   for i in range(n_images)]}
    if cid is not None:
        fields["category_id"] = cid
    for key, value in extra.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return bson.encode(fields)


def write(tmp_path, *docs: bytes, name="train.bson") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(docs))
    return str(path)

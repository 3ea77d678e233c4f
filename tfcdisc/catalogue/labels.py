"""A labels file (``_id,category_id``, as a synthetic catalogue's test_labels.csv): read
and checked without TensorFlow, so that `tfcdisc.evaluate` refuses a bad one at once."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tfcdisc.catalogue import paths


def _fits_int64(text: str) -> bool:
    """False for an integer past int64 (it raised a raw OverflowError); True otherwise."""
    try:
        return -2 ** 63 <= int(text) < 2 ** 63
    except ValueError:
        return True  # not an integer: named as such


def read(path: str) -> dict[int, int]:
    """``_id,category_id`` CSV (test_labels.csv) -> {product id: category id}.

    Every flaw is named with its file and line: a missing or empty file, missing columns,
    no rows, a blank or non-integer value, a duplicate _id.
    """
    if not paths.exists(path):
        raise FileNotFoundError(f"--labels={path}: no such file")
    if paths.isdir(path):
        raise ValueError(f"--labels={path} is a folder; give the _id,category_id CSV file")
    try:
        with paths.open_binary(path) as f:
            frame = pd.read_csv(f, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; expected the header _id,category_id and one "
                         "row per product") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a CSV file ({e})") from None
    missing = {"_id", "category_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected _id,category_id")
    if not len(frame):
        raise ValueError(f"{path}: a header and no rows; expected one row per product")
    values = {}
    for column in ("_id", "category_id"):
        text = frame[column].str.strip()
        bad = ~text.str.fullmatch(r"[+-]?\d+")
        bad |= ~text.map(_fits_int64).astype(bool)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path}: line {i + 2}: {column} {frame[column].iloc[i]!r} is not "
                             "an integer of 64 bits")
        values[column] = text.astype(np.int64)
    ids = values["_id"]
    if ids.duplicated().any():
        i = int(np.flatnonzero(ids.duplicated().to_numpy())[0])
        raise ValueError(f"{path}: line {i + 2}: duplicate _id {int(ids.iloc[i])}")
    return dict(zip(ids.tolist(), values["category_id"].tolist()))

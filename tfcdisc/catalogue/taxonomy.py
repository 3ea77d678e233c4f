"""The category taxonomy: class index <-> category_id and the three-level hierarchy.

This is the only module that reads ``category_names.csv``. Later stages get the same
`Taxonomy` back from the TFDS dataset's metadata or the SavedModel (`to_dict` /
`from_dict`), so they never need the CSV.

Order is canonical, so that a class index means the same thing everywhere:
classes sort by category_id, level-1 nodes by name, level-2 nodes by
(level-1 name, level-2 name). A level-2 name under two level-1 parents is two nodes
(the real file has 483 level-2 names but 486 level-1/level-2 pairs).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import tensorflow as tf

COLUMNS = ("category_id", "category_level1", "category_level2", "category_level3")


class TaxonomyError(ValueError):
    """``category_names.csv`` cannot be used as it is."""


@dataclasses.dataclass(frozen=True, eq=False)
class Taxonomy:
    """An ordered three-level taxonomy.

    Attributes:
      category_ids: int64 [num_classes], sorted; class index -> category_id.
      level3_names: [num_classes] French leaf names.
      level1_names: [num_level1] sorted names.
      level2_names: [num_level2] names of level-2 nodes (a name may repeat).
      class_to_level2: int32 [num_classes] parent level-2 node of each class.
      level2_to_level1: int32 [num_level2] parent level-1 node of each level-2 node.
    """

    category_ids: np.ndarray
    level3_names: tuple[str, ...]
    level1_names: tuple[str, ...]
    level2_names: tuple[str, ...]
    class_to_level2: np.ndarray
    level2_to_level1: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_level1(self) -> int:
        return len(self.level1_names)

    @property
    def num_level2(self) -> int:
        return len(self.level2_names)

    @property
    def class_to_level1(self) -> np.ndarray:
        return self.level2_to_level1[self.class_to_level2]

    def class_index(self, category_ids) -> np.ndarray:
        """Maps category ids (scalar or array) to class indices; unknown ids raise."""
        ids = np.asarray(category_ids, dtype=np.int64)
        idx = np.searchsorted(self.category_ids, ids)
        idx = np.minimum(idx, self.num_classes - 1)
        bad = self.category_ids[idx] != ids
        if np.any(bad):
            unknown = np.unique(np.atleast_1d(ids)[np.atleast_1d(bad)])[:10].tolist()
            raise KeyError(f"category ids not in the taxonomy: {unknown}")
        return idx

    def names(self, class_index: int) -> tuple[str, str, str]:
        """(level-1, level-2, level-3) names of a class, for reports."""
        l2 = int(self.class_to_level2[class_index])
        return (self.level1_names[int(self.level2_to_level1[l2])], self.level2_names[l2],
                self.level3_names[class_index])

    def to_dict(self) -> dict:
        """A JSON-serialisable form, stored in dataset metadata and SavedModels."""
        return {
            "category_ids": self.category_ids.tolist(),
            "level3_names": list(self.level3_names),
            "level1_names": list(self.level1_names),
            "level2_names": list(self.level2_names),
            "class_to_level2": self.class_to_level2.tolist(),
            "level2_to_level1": self.level2_to_level1.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Taxonomy":
        return cls(np.asarray(d["category_ids"], np.int64), tuple(d["level3_names"]),
                   tuple(d["level1_names"]), tuple(d["level2_names"]),
                   np.asarray(d["class_to_level2"], np.int32),
                   np.asarray(d["level2_to_level1"], np.int32))

    def to_frame(self) -> pd.DataFrame:
        """The taxonomy as ``category_names.csv`` rows (class order)."""
        l1, l2, l3 = zip(*(self.names(i) for i in range(self.num_classes)))
        return pd.DataFrame({"category_id": self.category_ids, "category_level1": l1,
                             "category_level2": l2, "category_level3": l3})


def from_frame(frame: pd.DataFrame, source: str = "<frame>") -> Taxonomy:
    """Builds a `Taxonomy` from rows with the four ``category_names.csv`` columns."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise TaxonomyError(f"{source}: missing column(s) {missing}; expected the header "
                            f"{','.join(COLUMNS)}")
    if frame.empty:
        raise TaxonomyError(f"{source}: no categories")
    ids = pd.to_numeric(frame["category_id"], errors="coerce")
    # Past int64 (99999999999999999999 was stored as -9223372036854775808) or negative.
    bad = ids.isna() | (ids != ids.round()) | (ids < 0) | (ids >= 2.0 ** 63)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TaxonomyError(f"{source}: line {row + 2}: category_id "
                            f"{frame['category_id'].iloc[row]!r} is not an integer from 0 "
                            "to 2^63-1")
    ids = ids.astype(np.int64)
    dup = ids.duplicated(keep=False)
    if dup.any():
        lines = (np.flatnonzero(dup.to_numpy()) + 2).tolist()[:10]
        raise TaxonomyError(f"{source}: duplicate category_id "
                            f"{int(ids[dup].iloc[0])} (lines {lines}); each id must appear once")
    # Whitespace normalised: the real file has trailing and doubled spaces, and a name that
    # differs from another only by them is the same level, not a new one; a name with a
    # line break would make the dataset's label files disagree with the taxonomy.
    names = frame[list(COLUMNS[1:])].astype(str).apply(
        lambda column: column.map(lambda name: " ".join(name.split())))
    empty = (names == "").to_numpy()
    if empty.any():
        row, col = (int(i[0]) for i in np.nonzero(empty))
        raise TaxonomyError(f"{source}: line {row + 2}: {COLUMNS[1 + col]} is empty; every "
                            "category needs its three level names")
    df = pd.DataFrame({"id": ids.to_numpy(), "l1": names.iloc[:, 0].to_numpy(),
                       "l2": names.iloc[:, 1].to_numpy(), "l3": names.iloc[:, 2].to_numpy()})
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    level1 = sorted(df["l1"].unique())
    pairs = sorted(set(zip(df["l1"], df["l2"])))
    l1_index = {n: i for i, n in enumerate(level1)}
    pair_index = {p: i for i, p in enumerate(pairs)}
    return Taxonomy(
        category_ids=df["id"].to_numpy(np.int64),
        level3_names=tuple(df["l3"]),
        level1_names=tuple(level1),
        level2_names=tuple(p[1] for p in pairs),
        class_to_level2=np.array([pair_index[p] for p in zip(df["l1"], df["l2"])], np.int32),
        level2_to_level1=np.array([l1_index[p[0]] for p in pairs], np.int32),
    )


def load(path: str) -> Taxonomy:
    """Reads ``category_names.csv`` from a local or gs:// path."""
    if not tf.io.gfile.exists(path):
        raise TaxonomyError(f"{path}: no such file; put the Kaggle category_names.csv there")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise TaxonomyError(f"{path}: empty file; expected the header category_id,"
                            "category_level1,category_level2,category_level3 and one row per "
                            "category (the Kaggle category_names.csv)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TaxonomyError(f"{path}: not a readable CSV ({e})") from None
    return from_frame(frame, path)

"""The taxonomy, on the real category_names.csv and on bad files."""

import numpy as np
import pandas as pd
import pytest

from conftest import REAL_CATEGORY_NAMES
from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc.catalogue.taxonomy import TaxonomyError

needs_real = pytest.mark.skipif(not REAL_CATEGORY_NAMES.exists(),
                                reason="the real taxonomy lives in ../shared/data beside the repo")


@needs_real
def test_real_taxonomy_counts_and_parents():
    tax = taxonomy_lib.load(str(REAL_CATEGORY_NAMES))
    assert tax.num_classes == 5270 and tax.num_level1 == 49 and tax.num_level2 == 486
    assert len(set(tax.level2_names)) == 483
    # Whitespace normalised (the file has trailing and doubled spaces): the counts hold.
    assert all(n == " ".join(n.split()) for n in tax.level1_names + tax.level2_names)
    assert (np.diff(tax.category_ids) > 0).all()
    raw = pd.read_csv(REAL_CATEGORY_NAMES, dtype=str, keep_default_na=False)
    by_id = raw.set_index(raw["category_id"].astype(np.int64))
    for c in (0, 17, 2500, 5269):
        row = by_id.loc[int(tax.category_ids[c])]
        assert tax.names(c) == tuple(" ".join(n.split()) for n in (  # whitespace normalised
            row.category_level1, row.category_level2, row.category_level3))
    assert tax.class_to_level1.shape == (5270,) and tax.class_to_level1.max() == 48
    assert tax.class_index([tax.category_ids[9], tax.category_ids[3]]).tolist() == [9, 3]
    # A level-2 name under two level-1 parents is two nodes.
    dup = [n for n in set(tax.level2_names) if tax.level2_names.count(n) > 1]
    assert dup
    parents = {tax.level2_to_level1[i] for i, n in enumerate(tax.level2_names) if n == dup[0]}
    assert len(parents) == 2


def test_round_trip_and_unknown_ids(tmp_path):
    frame = pd.DataFrame({"category_id": [30, 10, 20], "category_level1": ["B", "A", "A"],
                          "category_level2": ["x", "x", "y"], "category_level3": ["p", "q", "r"]})
    tax = taxonomy_lib.from_frame(frame)
    assert tax.category_ids.tolist() == [10, 20, 30]
    assert tax.level1_names == ("A", "B") and tax.level2_names == ("x", "y", "x")
    assert tax.class_to_level2.tolist() == [0, 1, 2] and tax.level2_to_level1.tolist() == [0, 0, 1]
    again = taxonomy_lib.Taxonomy.from_dict(tax.to_dict())
    assert again.to_dict() == tax.to_dict()
    path = tmp_path / "category_names.csv"
    tax.to_frame().to_csv(path, index=False)
    assert taxonomy_lib.load(str(path)).to_dict() == tax.to_dict()
    with pytest.raises(KeyError, match="25"):
        tax.class_index([10, 25])


@pytest.mark.parametrize("text,message", [
    ("category_id,category_level1,category_level2\n1,a,b\n", "missing column"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,a,b,d\n",
     "duplicate category_id 1 \\(lines \\[2, 3\\]\\)"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b,c\nx7,a,b,d\n",
     "line 3: category_id 'x7' is not an integer"),
    ("category_id,category_level1,category_level2,category_level3\n", "no categories"),
])
def test_bad_category_files(tmp_path, text, message):
    path = tmp_path / "category_names.csv"
    path.write_text(text)
    with pytest.raises(TaxonomyError, match=message) as e:
        taxonomy_lib.load(str(path))
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(TaxonomyError, match="no such file"):
        taxonomy_lib.load(str(tmp_path / "nope.csv"))


def test_level_names_are_normalised_and_empty_ones_refused(tmp_path):
    """A trailing space made a second level-1 class; a line break or an empty name made
    the dataset's label files disagree with the taxonomy."""
    path = tmp_path / "category_names.csv"
    path.write_text('category_id,category_level1,category_level2,category_level3\n'
                    '1,MAISON ,DECO,VASE\n2,MAISON,DECO ,"TAPIS\nROND"\n3,  AUTO  ,PNEU,ETE\n')
    tax = taxonomy_lib.load(str(path))
    assert tax.level1_names == ("AUTO", "MAISON") and tax.level2_names == ("PNEU", "DECO")
    assert tax.names(1) == ("MAISON", "DECO", "TAPIS ROND")
    path.write_text("category_id,category_level1,category_level2,category_level3\n"
                    "1,MAISON,DECO,VASE\n2,MAISON,  ,TAPIS\n")
    with pytest.raises(TaxonomyError, match="line 3: category_level2 is empty"):
        taxonomy_lib.load(str(path))

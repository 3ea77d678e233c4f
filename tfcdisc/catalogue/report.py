"""What is in a BSON file: products, images, categories, problems, as one JSON-able dict.

It builds (or reuses) the file's offset index, so a later `tfds build` starts faster.
The command is `tfcdisc.inspect`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the reader and the index load TensorFlow: only when a file is read
    from tfcdisc.catalogue import index as index_lib

_TOP = 10


def summarize(index: index_lib.OffsetIndex, taxonomy=None) -> dict:
    """The inspect report for an index; ``taxonomy`` adds category names."""
    n = len(index)
    counts = np.bincount(index.num_images, minlength=5) if n else np.zeros(5, int)
    report = {
        "file": index.path,
        "products": n,
        "images": index.num_images_total,
        "images_per_product": {str(k): int(c) for k, c in enumerate(counts) if k and c},
        "mean_images_per_product": round(index.num_images_total / n, 4) if n else 0.0,
        "labeled": index.labeled,
        "bytes": {
            "file": index.fingerprint["size"],
            "documents": int(index.lengths.sum(dtype=np.int64)),
            "mean_document": round(float(index.lengths.mean()), 1) if n else 0.0,
            "max_document": int(index.lengths.max()) if n else 0,
        },
        "product_id_range": ([int(index.product_ids.min()), int(index.product_ids.max())]
                             if n else None),
        "product_ids_increasing": bool(n < 2 or np.all(np.diff(index.product_ids) > 0)),
    }
    if index.labeled and n:
        ids, sizes = np.unique(index.category_ids, return_counts=True)
        order = np.argsort(-sizes, kind="stable")

        def entry(j):
            e = {"category_id": int(ids[j]), "products": int(sizes[j])}
            if taxonomy is not None:
                try:
                    e["names"] = list(taxonomy.names(int(taxonomy.class_index(ids[j]))))
                except KeyError:
                    e["names"] = None
            return e

        report["categories"] = {
            "count": len(ids),
            "largest": [entry(j) for j in order[:_TOP]],
            "smallest": [entry(j) for j in order[::-1][:_TOP]],
        }
        if taxonomy is not None:
            unknown = np.setdiff1d(ids, taxonomy.category_ids)
            report["categories"]["not_in_taxonomy"] = unknown[:100].tolist()
    report["corrupt"] = {
        "bad_documents": index.bad_documents,
        "skipped_bytes": index.skipped_bytes,
        "problems": [{"offset": int(o), "problem": p} for o, p in index.problems],
    }
    return report


def inspect_file(path: str, *, errors: str = "strict", category_names: str | None = None,
                 progress: bool = False) -> dict:
    """Indexes (or reuses the index of) a BSON file and summarizes it."""
    from tfcdisc.catalogue import bsonfile, paths
    from tfcdisc.catalogue import index as index_lib
    paths.check_input_file(path)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=bsonfile.file_size(path), unit="B", unit_scale=True, file=sys.stderr,
                   desc=os.path.basename(path), mininterval=0.5)
    index = index_lib.load_or_build(
        path, errors=errors, progress=(lambda off: bar.update(off - bar.n)) if bar else None)
    if bar:
        bar.close()
    taxonomy = None
    if category_names:
        from tfcdisc.catalogue import taxonomy as taxonomy_lib
        taxonomy = taxonomy_lib.load(category_names)
    return summarize(index, taxonomy)

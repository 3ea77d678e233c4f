"""Offset indexes built as Beam work: byte ranges of the BSON files, read in parallel.

A Beam build must not read 72 GB in the launching process before any worker starts.
Here each worker indexes one byte range (`tfcdisc.catalogue.index.scan_range`: reading begins at
the first document at or after the range's start, as the skip reader resynchronises),
writes its piece to the work folder, and the launcher joins the pieces, checking that
each range reader began exactly where its neighbour stopped. If they do not meet (a
range reader began at a false document start), or a range reader hit a problem in
strict mode, the file is indexed again in one pass, which reports the problem at its
true offset. The joined index is stored like any other and reused while the file is
unchanged.
"""

from __future__ import annotations

from typing import Sequence

from absl import logging
import tensorflow as tf

from tfcdisc.catalogue import atomic, bsonfile
from tfcdisc.catalogue import index as index_lib

RANGE_BYTES = 256 << 20  # one Beam element: ~30,000 real products, a few seconds of reading


def index_files(paths: Sequence[str], index_paths: Sequence[str], *, errors: str,
                beam_options, beam_runner=None, range_bytes: int = RANGE_BYTES
                ) -> dict[str, index_lib.OffsetIndex]:
    """Indexes files on Beam (reusing stored indexes of unchanged files).

    Args:
      paths: BSON files (local or gs://).
      index_paths: where each file's index is stored; pieces go beside it.
      errors: "strict" or "skip", as in `tfcdisc.catalogue.index.build`.
      beam_options: `PipelineOptions` for the pipeline; beam_runner: its runner.
      range_bytes: bytes per Beam element.

    Returns:
      {path: index}.
    """
    import apache_beam as beam
    out, tasks, todo = {}, [], {}
    for path, index_path in zip(paths, index_paths):
        stored = index_lib.load_stored(path, index_path=index_path, errors=errors)
        if stored is not None:
            out[path] = stored
            continue
        fp = index_lib.fingerprint(path)
        tf.io.gfile.makedirs(index_path.rsplit("/", 1)[0] if "/" in index_path else ".")
        cuts = list(range(0, fp["size"], range_bytes)) + [fp["size"]]
        pieces = [f"{index_path}.piece-{k:05d}-of-{len(cuts) - 1:05d}"
                  for k in range(len(cuts) - 1)]
        todo[path] = (index_path, fp, pieces)
        tasks += [(path, cuts[k], cuts[k + 1], errors, piece)
                  for k, piece in enumerate(pieces)]
    if tasks:
        logging.info("indexing %s on Beam: %d byte ranges", list(todo), len(tasks))
        with beam.Pipeline(runner=beam_runner, options=beam_options) as pipeline:
            _ = (pipeline | "ByteRanges" >> beam.Create(tasks)
                 | "Spread" >> beam.Reshuffle() | "Index" >> beam.Map(_index_range))
    for path, (index_path, fp, pieces) in todo.items():
        loaded = [_load_piece(p) for p in pieces]
        index = None
        if all("failed" not in p for p in loaded):
            index = index_lib.join(path, fp, loaded, errors)
        if index is None or index_lib.fingerprint(path) != fp:
            logging.warning("%s: indexing again in one pass (%s)", path, next(
                (p["failed"] for p in loaded if "failed" in p), "range readers did not meet"))
            index = index_lib.build(path, errors=errors)
        index_lib.store(index, index_path)
        for piece in pieces:
            tf.io.gfile.remove(piece)
        out[path] = index
    return out


def _index_range(task: tuple) -> None:
    """Beam work: one byte range's piece, written to its file."""
    path, start, end, errors, piece_path = task
    try:
        piece = index_lib.scan_range(path, start, end, errors=errors)
    except bsonfile.BsonFormatError as e:  # the one-pass rerun reports it, or disproves it
        piece = {"failed": str(e)}
    atomic.write_arrays(piece_path, {k: v for k, v in piece.items()
                                     if k not in index_lib.ARRAYS},
                        **{k: piece[k] for k in index_lib.ARRAYS if k in piece})


def _load_piece(piece_path: str) -> dict:
    data = atomic.read_arrays(piece_path)
    return {**data.pop("meta"), **data}

"""Batch prediction with an export: every product gets exactly one row.

    python -m tfcdisc.predict --saved_model=EXPORT --bson=test.bson --output=submission.csv
    python -m tfcdisc.predict --saved_model=EXPORT --data_dir=DATA --split=test \
        --output=submission.csv [--top_k_output=top5.parquet] [--strategy=auto] [--tpu=local]
    python -m tfcdisc.predict ... --bson=test.bson --errors=skip [--allow_missing]
    python -m tfcdisc.predict --saved_model=EXPORT --bson=gs://B/test.bson \
        --output=gs://B/submission.csv --beam_pipeline_options="runner=DataflowRunner,..."

Every product gets a row; an image that cannot be decoded is skipped and counted with its
product's _id. A document that cannot be read at all has no _id to give a row to: with
--errors=skip it is counted and listed as lost, and predict refuses to write a submission
with rows missing unless --allow_missing.

The model runs on the accelerator the strategy names (a TPU VM's chips, every GPU) or the
CPU; the submission is written atomically, in file order (`tfcdisc.inference`). With
--beam_pipeline_options the same submission is computed on Apache Beam (Dataflow, Flink,
Spark, or the DirectRunner), by Beam's RunInference over byte ranges of the file
(`tfcdisc.beam_predict`).
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from tfcdisc import cli, config


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    from tfcdisc import bsonfile, inference
    f = flags.FLAGS
    try:
        if f.beam_pipeline_options:
            stats = _predict_on_beam(f)
        else:
            stats = inference.predict(
                f.saved_model, f.output, bson=f.bson, data_dir=f.data_dir, split=f.split,
                batch_size=f.batch_size, top_k_output=f.top_k_output, strategy=f.strategy,
                tpu=f.tpu, errors=f.errors, allow_missing=f.allow_missing,
                dataset_config=f.dataset_config)
    except (ValueError, FileNotFoundError, bsonfile.BsonFormatError) as e:
        cli.fail("predict", str(e))
    except OSError as e:  # a full disk while writing: the old output stays
        cli.fail("predict", f"{e}; {f.output} was left as it was")
    print(json.dumps({"output": f.output, **stats.as_dict(listed=None)}, indent=2))
    if stats.products_lost:
        print(f"predict: {stats.bad_documents} unreadable document(s) and "
              f"{stats.skipped_bytes} skipped byte(s) have no row in {f.output} "
              "(--allow_missing); see \"lost\" above", file=sys.stderr)


def _predict_on_beam(f):
    if not f.bson or f.data_dir:
        raise ValueError("--beam_pipeline_options reads a BSON file: give --bson, not "
                         "--data_dir")
    if f.top_k_output:
        raise ValueError("--top_k_output is not written on Beam yet; drop it, or predict "
                         "without --beam_pipeline_options")
    from tfcdisc import beam_predict
    return beam_predict.predict(f.saved_model, f.output, bson=f.bson,
                                beam_options=beam_predict.pipeline_options(
                                    f.beam_pipeline_options),
                                batch_size=f.batch_size, errors=f.errors,
                                allow_missing=f.allow_missing)


def define_inference_flags(split: str) -> None:
    """The flags predict and evaluate share."""
    from absl import flags
    flags.DEFINE_string("saved_model", None, "Folder written by tfcdisc.export.", required=True)
    flags.DEFINE_string("bson", None, "A Kaggle-style BSON file (local or gs://).")
    flags.DEFINE_string("data_dir", None, "A built TFDS cdiscount dataset (instead of --bson).")
    flags.DEFINE_string("split", split, "The TFDS split, with --data_dir.")
    flags.DEFINE_string("dataset_config", None, config.DATASET_CONFIG_HELP)
    flags.DEFINE_integer("batch_size", 256, "Products per step across all replicas (rounded "
                         "up to a multiple of them).", lower_bound=1)
    flags.DEFINE_enum("strategy", "auto", list(config.INFERENCE_STRATEGIES),
                      "Where the model runs: auto (a TPU VM's TPU, else every GPU, else the "
                      "CPU), tpu, mirrored (all GPUs, or logical CPUs), default (one device).")
    flags.DEFINE_string("tpu", None, "TPU address or name (local on a TPU VM).")
    flags.DEFINE_enum("errors", "strict", ["strict", "skip"], "A --bson document that "
                      "cannot be read: strict stops with its byte offset; skip counts it, "
                      "resynchronises and goes on (its product has no row).")


def _define_flags() -> None:
    from absl import flags
    define_inference_flags("test")
    flags.DEFINE_string("output", "submission.csv", "The submission CSV (_id,category_id).")
    flags.DEFINE_string("top_k_output", None, "Also write top-k ids and probabilities per "
                        "product (.parquet or .csv), for ensembling.")
    flags.DEFINE_bool("allow_missing", False, "With --errors=skip, write the submission even "
                      "if unreadable documents leave products without a row (listed in the "
                      "report as lost).")
    flags.DEFINE_string("beam_pipeline_options", None, "Run on Apache Beam with these "
                        "options, comma-separated as for `tfds build` (e.g. "
                        "\"runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,"
                        "setup_file=./pyproject.toml\"); needs --bson.")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()

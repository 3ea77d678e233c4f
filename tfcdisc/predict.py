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
CPU; the submission is written atomically, in file order (`tfcdisc.serve.inference`). With
--beam_pipeline_options the same submission is computed on Apache Beam (Dataflow, Flink,
Spark, or the DirectRunner), by Beam's RunInference over byte ranges of the file
(`tfcdisc.serve.beam_predict`).
"""

from __future__ import annotations

import json
import sys

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.PredictSettings) -> None:
    from tfcdisc.serve import export_layout
    export_layout.check_paths(f)  # before TensorFlow starts: a wrong path is refused at once
    from tfcdisc.serve import inference
    if f.beam_pipeline_options:
        stats = _predict_on_beam(f)
    else:
        stats = inference.predict(
            f.saved_model, f.output, bson=f.bson, data_dir=f.data_dir, split=f.split,
            batch_size=f.batch_size, top_k_output=f.top_k_output, strategy=f.strategy,
            tpu=f.tpu, errors=f.errors, allow_missing=f.allow_missing,
            dataset_config=f.dataset_config)
    print(json.dumps({"output": f.output, **stats.as_dict(listed=None)}, indent=2))
    if stats.products_lost:
        print(f"predict: {stats.bad_documents} unreadable document(s) and "
              f"{stats.skipped_bytes} skipped byte(s) have no row in {f.output} "
              "(--allow_missing); see \"lost\" above", file=sys.stderr)


def _predict_on_beam(f: settings.PredictSettings):
    if not f.bson or f.data_dir:
        raise ValueError("--beam_pipeline_options reads a BSON file: give --bson, not "
                         "--data_dir")
    if f.top_k_output:
        raise ValueError("--top_k_output is not written on Beam yet; drop it, or predict "
                         "without --beam_pipeline_options")
    from tfcdisc.serve import beam_predict
    return beam_predict.predict(f.saved_model, f.output, bson=f.bson,
                                beam_options=beam_predict.pipeline_options(
                                    f.beam_pipeline_options),
                                batch_size=f.batch_size, errors=f.errors,
                                allow_missing=f.allow_missing)


# A full disk while writing: the old output stays.
run = cli.command("predict", settings.PredictSettings, main, __doc__, backend="flag",
                  after_os_error="{output} was left as it was",
                  after_stop="{output} was left as it was (written only when complete): "
                  "rerun the same command")


if __name__ == "__main__":
    run()

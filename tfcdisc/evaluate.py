"""Scores an export on labelled products: one JSON report (and a plot).

    python -m tfcdisc.evaluate --saved_model=EXPORT --bson=test.bson --labels=test_labels.csv
    python -m tfcdisc.evaluate --saved_model=EXPORT --bson=LABELLED.bson
    python -m tfcdisc.evaluate --saved_model=EXPORT --data_dir=DATA --split=validation \
        [--output=report.json] [--plot=report.png] [--strategy=auto] [--tpu=local]

It runs the same prediction path as `tfcdisc.predict` (and as training's validation), so
its ``product_accuracy`` is exactly the submission's score against the labels.
"""

from __future__ import annotations

from typing import Sequence

from tfcdisc import cli
from tfcdisc.predict import define_inference_flags


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    from tfcdisc import atomic, bsonfile, scoring
    f = flags.FLAGS
    try:
        from tfcdisc.inference import check_output
        for flag, path in (("--output", f.output), ("--plot", f.plot)):
            if path:
                check_output(path, flag)
        report = scoring.evaluate(f.saved_model, bson=f.bson, labels=f.labels,
                                  data_dir=f.data_dir, split=f.split, batch_size=f.batch_size,
                                  strategy=f.strategy, tpu=f.tpu, errors=f.errors,
                                  strict=f.strict,
                                  dataset_config=f.dataset_config)
        text = scoring.to_json(report)
        if f.output:  # whole or not at all: a full disk leaves the old report
            atomic.write(f.output, text + "\n")
        if f.plot:
            scoring.plot(report, f.plot)
    except (ValueError, OSError, bsonfile.BsonFormatError) as e:  # OSError: full disk...
        cli.fail("evaluate", str(e))
    print(text)


def _define_flags() -> None:
    from absl import flags
    define_inference_flags("validation")
    flags.DEFINE_string("labels", None, "_id,category_id CSV for an unlabelled --bson "
                        "(test_labels.csv of a synthetic catalogue).")
    flags.DEFINE_string("output", None, "Also write the report to this JSON file.")
    flags.DEFINE_string("plot", None, "Save a PNG: accuracy by category size and by level.")
    flags.DEFINE_bool("strict", False, "Fail (exit 2) when labels name categories the "
                      "export does not know, instead of warning.")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()

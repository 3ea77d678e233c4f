"""Scores an export on labelled products: one JSON report (and a plot).

    python -m tfcdisc.evaluate --saved_model=EXPORT --bson=test.bson --labels=test_labels.csv
    python -m tfcdisc.evaluate --saved_model=EXPORT --bson=LABELLED.bson
    python -m tfcdisc.evaluate --saved_model=EXPORT --data_dir=DATA --split=validation \
        [--output=report.json] [--plot=report.png] [--strategy=auto] [--tpu=local]

It runs the same prediction path as `tfcdisc.predict` (and as training's validation), so
its ``product_accuracy`` is exactly the submission's score against the labels.
"""

from __future__ import annotations


from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.EvaluateSettings) -> None:
    # Before TensorFlow starts: a wrong path is refused at once.
    from tfcdisc.serve import export_layout
    export_layout.check_paths(f, {"--output": f.output, "--plot": f.plot})
    from tfcdisc.catalogue import labels
    label_map = labels.read(f.labels) if f.labels else None
    from tfcdisc.catalogue import atomic
    from tfcdisc.serve import scoring
    report = scoring.evaluate(f.saved_model, bson=f.bson, labels=f.labels,
                              data_dir=f.data_dir, split=f.split, batch_size=f.batch_size,
                              strategy=f.strategy, tpu=f.tpu, errors=f.errors,
                              strict=f.strict, dataset_config=f.dataset_config,
                              label_map=label_map, thumbnails=bool(f.plot))
    text = scoring.to_json(report)
    if f.output:  # whole or not at all: a full disk leaves the old report
        atomic.write(f.output, text + "\n")
    if f.plot:
        scoring.plot(report, f.plot)
    print(text)


run = cli.command("evaluate", settings.EvaluateSettings, main, __doc__, backend="flag",
                  after_os_error="")  # a full disk, a read-only folder: one line


if __name__ == "__main__":
    run()

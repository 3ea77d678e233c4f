"""What is in this BSON file? One JSON object on stdout, progress on stderr.

    python -m tfcdisc.inspect --bson train.bson [--errors=skip]

Builds (or reuses) the file's offset index, so a later `tfds build` starts faster. A
truncated or corrupt file exits with status 2 and a message naming the byte offset,
unless ``--errors=skip`` asks to skip, count and list the bad parts.
"""

from __future__ import annotations

import json
import os
import sys

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.InspectSettings) -> None:
    from tfcdisc.catalogue import paths
    paths.check_input_file(f.bson)  # before TensorFlow starts
    from tfcdisc.catalogue import report
    names = f.category_names
    if names is None:
        sibling = os.path.join(os.path.dirname(f.bson), "category_names.csv")
        import tensorflow as tf
        names = sibling if tf.io.gfile.exists(sibling) else None
    summary = report.inspect_file(f.bson, errors=f.errors, category_names=names or None,
                                  progress=sys.stderr.isatty() or f.progress)
    json.dump(summary, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


run = cli.command("inspect", settings.InspectSettings, main, __doc__)


if __name__ == "__main__":
    run()

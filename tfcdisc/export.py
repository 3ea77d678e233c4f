"""Exports a trained run as a self-contained SavedModel for batch inference and serving.

    python -m tfcdisc.export --model_dir=RUN --export_dir=EXPORT [--top_k=5] [--tta=flip] \
        [--duplicates_from=DATA]

The SavedModel needs neither tfcdisc nor category_names.csv (`tfcdisc.serve.export_format` says what
its signatures take and return); `tfcdisc.predict` and `tfcdisc.evaluate` read it.
"""

from __future__ import annotations

import json

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.ExportSettings) -> None:
    from tfcdisc.serve import exporting
    summary = exporting.export(f.model_dir, f.export_dir, top_k=f.top_k,
                               checkpoint=f.checkpoint, tta=f.tta,
                               duplicates_from=f.duplicates_from, fusion_dir=f.fusion_dir,
                               lock_lease_minutes=f.lock_lease_minutes, phase=f.phase)
    print(json.dumps(summary, indent=2))


run = cli.command("export", settings.ExportSettings, main, __doc__, backend="tensorflow",
                  after_stop="{export_dir} was left as it was (an export replaces it only "
                  "when whole): rerun the same command")


if __name__ == "__main__":
    run()

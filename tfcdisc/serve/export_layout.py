"""The files of an export, and the check that a folder is one, without TensorFlow.

`export_format` writes and reads these files; the commands check a ``--saved_model``
here first, so that a wrong folder is refused at once, before TensorFlow starts.
"""

from __future__ import annotations

from tfcdisc.catalogue import paths

KERAS_MODEL = "assets/image_model.keras"
METADATA = "assets/tfcdisc.json"
DUPLICATES = "assets/duplicates.npz"
FUSION = "assets/fusion.keras"


def check(export_dir: str) -> None:
    """Raises FileNotFoundError unless ``export_dir`` holds an export's model and metadata."""
    root = export_dir.rstrip("/")
    if not paths.exists(f"{root}/{KERAS_MODEL}") or not paths.exists(f"{root}/{METADATA}"):
        raise FileNotFoundError(f"{export_dir}: not a tfcdisc export (no {KERAS_MODEL}); give "
                                "the --export_dir of `python -m tfcdisc.export`")

"""The files of an export, and what an inference command can refuse without TensorFlow.

`export_format` writes and reads these files; predict and evaluate check their paths
here first (`check_paths`: the export is one, the BSON file is there, the outputs can be
written), so that a wrong path is refused at once, before TensorFlow starts.
"""

from __future__ import annotations

from tfcdisc.catalogue import paths

KERAS_MODEL = "assets/image_model.keras"
METADATA = "assets/tfcdisc.json"
DUPLICATES = "assets/duplicates.npz"
FUSION = "assets/fusion.keras"  # an earlier version's fusion head: refused on load


def check(export_dir: str) -> None:
    """Raises FileNotFoundError unless ``export_dir`` holds an export's model and metadata."""
    root = export_dir.rstrip("/")
    if not paths.exists(f"{root}/{KERAS_MODEL}") or not paths.exists(f"{root}/{METADATA}"):
        raise FileNotFoundError(f"{export_dir}: not a tfcdisc export (no {KERAS_MODEL}); give "
                                "the --export_dir of `python -m tfcdisc.export`")


def check_paths(f, outputs: dict[str, str | None] | None = None) -> None:
    """Refuses the paths of an inference command's settings (``settings.InferenceSettings``)
    that cannot work; ``outputs``: ``{"--flag": path}`` written (default: its --output)."""
    for flag, path in (outputs or {"--output": getattr(f, "output", None)}).items():
        if path:
            paths.check_output(path, flag)
    if f.bson:
        paths.check_input_file(f.bson)
    check(f.saved_model)

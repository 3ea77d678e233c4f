"""A setting: a dataclass field that is also a command-line flag.

The field carries its help text, choices and bounds in its metadata, so a command's flags,
their defaults and its dataclass cannot drift apart: `define_settings` makes the absl
flags of a dataclass, `settings_from_flags` reads them back, `parse` does both without the
process's global flags (notebooks, tests), and `expand_flagfiles` reads ``--flagfile``s,
the shipped recipes (`recipe`) found by name. One default per setting: library functions
whose argument is a setting take their default from here.

This module imports no TensorFlow and no other tfcdisc module: ``--help`` answers at once,
and every floor of the package may read it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

# A folder lock whose holder stopped refreshing it is taken over after this
# (`catalogue.folder_lock`; ``--lock_lease_minutes``).
__all__ = ["DEFAULT_LEASE_MINUTES", "setting", "expand_path", "lease_setting",
           "paths_by_role", "bound_problem", "check", "differences", "define_settings",
           "settings_from_flags", "recipes", "recipe", "expand_flagfiles", "parse"]

DEFAULT_LEASE_MINUTES = 5.0


def setting(default: Any, help: str, *, choices: tuple | None = None,
            lower_bound: float | None = None, upper_bound: float | None = None,
            below: float | None = None, required: bool = False,
            model: bool = False, repeated: bool = False, role: str | None = None,
            path: bool = False) -> Any:
    """A dataclass field that also describes its flag (``repeated``: the flag may be
    given several times, a list). A float must be finite (``nan`` passes a lower bound),
    at most ``upper_bound`` and less than ``below``: past them a value means nothing
    (a label smoothing of 5 trained a diverging run to the end). ``role``: "input",
    "output" or "replaced" (an output folder replaced whole), a path the command reads or
    writes (`paths.check_apart` keeps them apart). A setting with a role, or ``path``, is
    a path: ``~`` and ``$VARIABLES`` in it are expanded (`expand_path`)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, lower_bound=lower_bound, upper_bound=upper_bound,
        below=below, required=required, model=model, repeated=repeated, role=role,
        path=path or role is not None))


def expand_path(value: Any) -> Any:
    """``~`` and ``$VARIABLES`` expanded as a shell would have: after ``--flag=`` no shell
    expands them (``--data_dir=~/tensorflow_datasets`` named a folder called ``~``).
    Cloud paths (``gs://``) and non-strings pass unchanged; lists element by element."""
    import os
    if isinstance(value, (list, tuple)):
        return type(value)(expand_path(v) for v in value)
    if not isinstance(value, str) or "://" in value:
        return value
    return os.path.expandvars(os.path.expanduser(value))


def lease_setting() -> Any:
    """``--lock_lease_minutes`` of every command that holds a folder's lock."""
    return setting(DEFAULT_LEASE_MINUTES, "Minutes after which a lock of another host whose "
                   "holder stopped refreshing it (a recycled VM, a preempted TPU) is taken "
                   "over; its holder refreshes it every quarter of this.", lower_bound=0.1)


def paths_by_role(settings: Any, *roles: str) -> dict[str, str]:
    """``{"--flag": path}`` of the settings' paths of the given roles (`setting`)."""
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("role") in roles and value:
            for i, path in enumerate(value if isinstance(value, list) else [value]):
                out[f"--{f.name}" + (f"[{i}]" if isinstance(value, list) else "")] = path
    return out


def bound_problem(name: str, value: Any, metadata: dict) -> str | None:
    """Why ``value`` is out of a setting's bounds (one line naming the flag), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return f"--{name}={value}: must be a finite number"
    low, high, below = (metadata.get(k) for k in ("lower_bound", "upper_bound", "below"))
    if low is not None and value < low:
        return f"--{name}={value}: must be at least {low}"
    if high is not None and value > high:
        return f"--{name}={value}: must be at most {high}"
    if below is not None and value >= below:
        return f"--{name}={value}: must be less than {below}"
    return None


def check(settings: Any) -> None:
    """Refuses values the flags would refuse, for callers that build a config in Python."""
    for f in dataclasses.fields(settings):
        value, m = getattr(settings, f.name), f.metadata
        if m.get("required") and not value:
            raise ValueError(f"--{f.name} is required")
        if value is None:
            continue
        if m.get("choices") and value not in m["choices"]:
            raise ValueError(f"--{f.name}={value}: choose from {', '.join(m['choices'])}")
        problem = bound_problem(f.name, value, m)
        if problem:
            raise ValueError(problem)


def differences(saved: dict, settings: Any, fields: Sequence[str]) -> list[str]:
    """``--name=value (the run has other)`` for each of ``fields`` that differs."""
    return [f"--{k}={getattr(settings, k)} (the run has {saved.get(k)})" for k in fields
            if k in saved and saved[k] != getattr(settings, k)]


# --------------------------------------------------------------------------- flags


def define_settings(cls: type, flag_values=None) -> None:
    """Defines one absl flag per field of ``cls`` (a dataclass made with `setting`)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = None if m["required"] else f.default
        kind = str(f.type).split("|")[0].strip()
        kwargs = dict(flag_values=fv, required=m["required"])
        if m.get("repeated"):
            flags.DEFINE_multi_string(f.name, default, m["help"], **kwargs)
        elif kind.startswith("list"):
            flags.DEFINE_list(f.name, default, m["help"], **kwargs)
        elif m["choices"]:
            flags.DEFINE_enum(f.name, default, list(m["choices"]), m["help"], **kwargs)
        elif kind == "bool":
            flags.DEFINE_bool(f.name, default, m["help"], **kwargs)
        elif kind == "int":
            flags.DEFINE_integer(f.name, default, m["help"], lower_bound=m["lower_bound"],
                                 **kwargs)
        elif kind == "float":
            flags.DEFINE_float(f.name, default, m["help"], **kwargs)
            _check_bounds(fv, f.name, m)
        else:
            flags.DEFINE_string(f.name, default, m["help"], **kwargs)


def _check_bounds(fv, name: str, metadata: dict) -> None:
    """Finite and within the setting's bounds (`bound_problem`): absl's own
    lower bound lets ``nan`` through."""
    from absl import flags

    def valid(value) -> bool:
        problem = bound_problem(name, value, metadata)
        if problem:
            raise flags.ValidationError(problem.split(": ", 1)[1])
        return True
    flags.register_validator(name, valid, flag_values=fv)


def settings_from_flags(cls: type, flag_values=None) -> Any:
    """An instance of ``cls`` from parsed flags defined by `define_settings`."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    return cls(**{f.name: expand_path(fv[f.name].value) if f.metadata.get("path")
                  else fv[f.name].value for f in dataclasses.fields(cls)})


def _recipe_folders() -> list[str]:
    """Where the shipped flagfiles are: the source tree's experiments/ (a clone, an
    editable install), then an installed wheel's copy (share/tfcdisc/experiments)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [f for f in (os.path.join(here, "experiments"),
                        os.path.join(sys.prefix, "share", "tfcdisc", "experiments"))
            if os.path.isdir(f)]


def recipes() -> list[str]:
    """The names of the shipped flagfiles (``--flagfile=NAME`` from any folder)."""
    return sorted({name[:-4] for folder in _recipe_folders() for name in os.listdir(folder)
                   if name.endswith(".cfg")})


def recipe(name: str) -> str | None:
    """The shipped flagfile called ``name`` (``xception_tpu``, ``xception_tpu.cfg`` or
    ``experiments/xception_tpu.cfg``), or None."""
    base = os.path.basename(name)
    base = base if base.endswith(".cfg") else base + ".cfg"
    if os.path.dirname(name) not in ("", "experiments"):
        return None
    for folder in _recipe_folders():
        if os.path.isfile(os.path.join(folder, base)):
            return os.path.join(folder, base)
    return None


def expand_flagfiles(argv: Sequence[str], _within: str | None = None,
                     _seen: tuple[str, ...] = ()) -> list[str]:
    """``argv`` with every ``--flagfile`` replaced by the flags in it, in place (so later
    flags still override earlier ones, as absl's own flagfiles do).

    A flagfile inside a flagfile is found beside the file that names it (then from the
    working folder): ``experiments/xception_tpu_ft224.cfg`` names ``xception_tpu.cfg``
    and works from any folder, a notebook's included. A line that is not a flag is
    refused: absl ignored ``image_size=48`` (no dashes) without a word, and the run
    silently used the default.

    Raises:
      ValueError: a missing flagfile, a loop, or a line that is not a flag (naming the
        file and the line number, with the fix).
    """
    out, args, i = [], list(argv), 0
    while i < len(args):
        arg = args[i]
        path = None
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
        elif arg == "--flagfile" and i + 1 < len(args):
            path, i = args[i + 1], i + 1
        i += 1
        if path is None:
            out.append(arg)
            continue
        path = expand_path(path)
        if _within and not os.path.isabs(path) and os.path.exists(os.path.join(_within, path)):
            path = os.path.join(_within, path)
        if not os.path.isfile(path):
            path = recipe(path) or path
        if not os.path.isfile(path):
            raise ValueError(f"--flagfile={path}: no such file"
                             + (f" (named in a flagfile in {_within})" if _within else "")
                             + f"; the shipped recipes: {', '.join(recipes()) or 'none found'}")
        real = os.path.realpath(path)
        if real in _seen:
            raise ValueError(f"--flagfile={path} includes itself")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        flags_in_file = []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(("#", "//")):
                continue
            if not line.startswith("-"):
                raise ValueError(f"{path}:{number}: {line!r} is not a flag (flags start "
                                 f"with --, e.g. --{line}); fix or comment out the line")
            flags_in_file.append(line)
        out.extend(expand_flagfiles(flags_in_file, os.path.dirname(path) or ".",
                                    (*_seen, real)))
    return out


def parse(cls: type, argv: list[str]) -> Any:
    """An instance of ``cls`` from command-line style flags (``--flagfile=...`` works),
    without touching the process's global flags: for notebooks and tests."""
    from absl import flags
    argv = expand_flagfiles(argv)
    fv = flags.FlagValues()
    define_settings(cls, fv)
    fv(["tfcdisc", *argv])
    return settings_from_flags(cls, fv)

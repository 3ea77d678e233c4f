"""Runs an entry point: its flags, a quick ``--help``, quiet start-up, flags.txt.

Entry modules define their flags without importing TensorFlow and import their library
inside ``main``, so ``--help`` answers at once (exit 0) and TensorFlow's C++ start-up
messages can be silenced before TensorFlow loads. ``--verbosity=0`` (absl's flag) brings
them and the library's INFO logs back (absl's flag: 0 INFO, 1 DEBUG).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from typing import Any, Callable, Sequence

from tfcdisc.catalogue import stops
from tfcdisc.settings.fields import (define_settings, expand_flagfiles, paths_by_role,
                                     settings_from_flags)

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")
_OWN: list[str] = []  # the names of the flags the running command defined
_REQUIRED: set[str] = set()


def own_flags(flag_values=None) -> list:
    """The flags this command defined (absl's own left out), each once."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    return [fv[name] for name in _OWN if name in fv]


def flags_text(flag_values=None) -> str:
    """Every flag of the command with its value, one per line (a reusable --flagfile)."""
    return "".join(f.serialize() + "\n" for f in own_flags(flag_values) if f.value is not None)


def _help(program: str, doc: str | None) -> str:
    lines = [textwrap.dedent(doc or "").strip(), "", f"flags of {program}:"]
    for f in own_flags():
        default = "" if f.default is None else f" (default: {f.default_as_str})"
        req = " (required)" if f.name in _REQUIRED else ""
        lines.append(f"  --{f.name}: " + textwrap.fill(
            f.help + default + req, width=92, subsequent_indent="    ",
            break_long_words=False, break_on_hyphens=False))  # copyable choices and paths
    lines.append("  --flagfile: read flags from a file (experiments/*.cfg)")
    lines.append("  --verbosity: 0 shows TensorFlow's start-up messages and INFO logs, 1 DEBUG")
    return "\n".join(lines) + "\n"


def run(define_flags: Callable[[], None], main: Callable[[Sequence[str]], None],
        doc: str | None = None, backend: str | None = None) -> None:
    """Runs ``main`` under absl with the command's flags.

    ``backend``: "flag" gives the command a ``--backend`` flag (`tfcdisc.learn.backend`), and
    "tensorflow" fixes it (commands that write a SavedModel); either way Keras's backend
    is chosen before ``main`` imports anything. None: the command runs no model.
    """
    from absl import app, flags
    fv = flags.FLAGS
    before = set(fv)
    define_flags()
    if backend == "flag" and "backend" not in fv:
        from tfcdisc.settings import BACKEND_HELP, BACKENDS
        flags.DEFINE_enum("backend", "auto", list(BACKENDS), BACKEND_HELP)
    _OWN[:] = [n for n in fv if n not in before and fv[n].name == n]
    _REQUIRED.update(_required(fv))
    program = os.path.basename(sys.argv[0])
    if any(a in _HELP for a in sys.argv[1:]):
        sys.stdout.write(_help(program, doc))
        sys.exit(0)

    def quiet_main(argv: Sequence[str]) -> None:
        import logging
        from absl import logging as absl_logging
        if not fv["verbosity"].present:  # quiet unless asked: our warnings and errors
            # Level 3: CUDA builds log a C++ error on every machine without a GPU.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            absl_logging.set_verbosity(absl_logging.WARNING)
            logging.getLogger("tensorflow").setLevel(logging.ERROR)
            quiet_library_notices()
        if backend is not None:
            from tfcdisc.learn import backend as backend_lib
            try:
                backend_lib.select(fv["backend"].value if backend == "flag" else backend)
            except ValueError as e:
                fail(program, str(e))
        try:
            main(argv)
        except ModuleNotFoundError as e:
            if e.name not in ("tensorflow", "tensorflow_datasets"):
                raise
            fail(program, "TensorFlow is not installed. It comes with an extra, because a TPU "
                 "needs another build of it: pip install 'tfcdisc[cpu]' (or [gpu], or [tpu] "
                 "as tfcdisc/learn/runtime.py says)")

    try:  # a bad flag is an ordinary mistake: one line, exit 2 (absl exits 1, with a banner)
        sys.argv[1:] = expand_flagfiles(sys.argv[1:])  # app.run parses sys.argv again
        fv(sys.argv)
    except ValueError as e:
        fail(program, str(e))
    except flags.Error as e:
        fail(program, f"{e}; see --help")
    fv.unparse_flags()  # app.run parses again; a second parse would double multi-flags
    app.run(quiet_main)


Terminated = stops.Terminated  # SIGTERM, unwinding like Ctrl-C
stops_unwind = stops.handled  # Ctrl-C and SIGTERM as ordinary stops while a command runs


def stopped(command: str, error: KeyboardInterrupt, kept: str) -> None:
    """One line for Ctrl-C (exit 130) or SIGTERM (exit 143): what was kept, and how to go
    on; no traceback."""
    how, code = ("SIGTERM", 143) if isinstance(error, Terminated) else ("Ctrl-C", 130)
    print(f"{command}: stopped by {how}; {kept}", file=sys.stderr, flush=True)
    sys.exit(code)


def command(name: str, cls: type, main: Callable[[Any], None], doc: str | None, *,
            backend: str | None = None, after_os_error: str = "",
            after_stop: str = "nothing was written: rerun the same command"
            ) -> Callable[[], None]:
    """The ``run`` of a command whose flags are the fields of ``cls`` (`define_settings`);
    ``main`` gets them as one ``cls``. An ordinary mistake (ValueError,
    FileNotFoundError: their messages name the fix) is one line and exit 2; so is an I/O
    error (`io_error`: a full disk, a read-only folder, an unreachable bucket), followed
    by ``after_os_error`` formatted with the settings (what was kept). Ctrl-C and SIGTERM
    are one line too, ``after_stop`` formatted likewise, exit 130 or 143 (`stopped`).
    Outputs that would overwrite inputs are refused first (`paths.check_apart`)."""
    def main_argv(argv: Sequence[str]) -> None:
        del argv
        settings = None
        try:
            settings = settings_from_flags(cls)  # a dataclass may check itself
            from tfcdisc.catalogue import paths
            paths.check_apart(paths_by_role(settings, "output", "replaced"),
                              paths_by_role(settings, "input"),
                              replaced=paths_by_role(settings, "replaced"))
            with stops_unwind():
                main(settings)
        except KeyboardInterrupt as e:
            stopped(name, e, after_stop.format(**dataclasses.asdict(settings))
                    if settings else "nothing was written")
        except (ValueError, FileNotFoundError) as e:
            fail(name, str(e))
        except Exception as e:  # noqa: BLE001 - only I/O errors are caught here
            reason = io_error(e)
            if reason is None:
                raise
            said = after_os_error.format(**dataclasses.asdict(settings)) if settings else ""
            fail(name, f"{reason}; {said}" if said else reason)

    def entry() -> None:
        run(lambda: define_settings(cls), main_argv, doc, backend)

    entry.settings_class, entry.backend, entry.doc = cls, backend, doc  # for `flag_entries`
    return entry


def flag_entries(entry: Callable[[], None]) -> list[dict]:
    """The flags of a command's ``run`` (`command`), as its ``--help`` lists them: name,
    help (an enum's choices first, as absl writes them), default as absl prints it
    (None: no default), required. Defined on fresh flags: the process's are untouched."""
    from absl import flags
    fv = flags.FlagValues()
    define_settings(entry.settings_class, fv)
    if entry.backend == "flag" and "backend" not in fv:  # as `run` defines it
        from tfcdisc.settings import BACKEND_HELP, BACKENDS
        flags.DEFINE_enum("backend", "auto", list(BACKENDS), BACKEND_HELP, flag_values=fv)
    required = {f.name for f in dataclasses.fields(entry.settings_class)
                if f.metadata["required"]}
    return [{"name": name, "help": fv[name].help,
             "default": None if fv[name].default is None else fv[name].default_as_str,
             "required": name in required} for name in fv if fv[name].name == name]


# TensorFlow's own errors for what an OSError says in Python: a full disk
# (ResourceExhausted), a read-only or forbidden path, an unreachable bucket.
_TF_IO_ERRORS = ("ResourceExhaustedError", "PermissionDeniedError", "UnavailableError",
                 "NotFoundError",
                 "DeadlineExceededError", "DataLossError", "UnauthenticatedError")


def io_error(error: BaseException) -> str | None:
    """One line for an I/O error (Python's OSError or TensorFlow's equivalents, which are
    not OSErrors), or None for any other error."""
    if isinstance(error, OSError):
        return str(error)
    if type(error).__name__ in _TF_IO_ERRORS and type(error).__module__.startswith(
            "tensorflow"):
        return f"{type(error).__name__}: {getattr(error, 'message', None) or error}"
    return None


def _no_library_deprecations(record) -> bool:
    """Drops other libraries' notices about their own APIs (tfds's TensorInfo.dtype...)."""
    return "deprecated" not in record.getMessage() or "tfcdisc" in record.pathname


def quiet_library_notices() -> None:
    """Other libraries' notices about their own deprecated APIs (tfds's `TensorInfo.dtype`
    on every dataset it opens, TensorFlow's `map_fn` under Keras) dropped where absl,
    TensorFlow or Python logging would print them: a command's output, a notebook's
    cells. Called twice, filters once."""
    import logging
    for target in (logging.getLogger("absl"), logging.getLogger("tensorflow"),
                   *logging.getLogger().handlers):
        if _no_library_deprecations not in target.filters:
            target.addFilter(_no_library_deprecations)


def _required(fv) -> set[str]:
    # absl keeps required flags as validators named after the flag; their message says so.
    names = set()
    for name in _OWN:
        for v in fv[name].validators:
            if "must have a value other than None" in str(getattr(v, "message", "")):
                names.add(name)
    return names


def fail(command: str, message: str) -> None:
    """One line on stderr naming what is wrong and the fix; exit status 2."""
    print(f"{command}: {message}", file=sys.stderr)
    sys.exit(2)

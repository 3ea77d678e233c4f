"""The package's layout: commands on top, four wings below, each importing only the wings
before it (function-level imports included), no Keras in the catalogue, no import circle.
Read from the source (ast), so nothing is imported."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tfcdisc"
WINGS = ("settings", "catalogue", "prepare", "learn", "serve")  # floors, ground first
COMMANDS = {"cli", "synth", "inspect", "build", "train", "train_fusion", "export", "ensemble",
            "predict", "evaluate", "show", "demo_summary", "preflight"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: pathlib.Path, modules) -> set[str]:
    """Every tfcdisc module and outside top-level package the file imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in modules else node.module)
    return {n if n in modules else n.split(".")[0] for n in found}


def _wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else None


def test_the_top_level_holds_only_the_commands_and_the_wings():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == COMMANDS
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(WINGS)


def test_each_wing_imports_only_the_wings_before_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        wing = _wing(name)
        if wing is None:
            continue
        for imported in _imports(path, modules):
            if imported == "tfcdisc" or (imported.startswith("tfcdisc.")
                                         and _wing(imported) is None):
                wrong.append(f"{name} imports the command level ({imported})")
            elif imported.startswith("tfcdisc.") and \
                    WINGS.index(_wing(imported)) > WINGS.index(wing):
                wrong.append(f"{name} imports {imported}, a later wing")
            elif wing == "catalogue" and imported in ("keras", "jax"):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    modules = _modules()
    graph = {name: {i for i in _imports(path, modules) if i in modules and i != name
                    and not modules[i].name == "__init__.py"}
             for name, path in modules.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(
                stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for other in sorted(graph[name]):
            visit(other)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_every_test_file_is_collected(request):
    """pytest skips folders named ``build`` unless told: tests/build was once silently left
    out. Every test file must lie under the configured test paths, in no folder that
    ``norecursedirs`` excludes (pytest matches each folder's name against its patterns)."""
    import fnmatch
    config = request.config
    root = config.rootpath
    testpaths = [root / p for p in config.getini("testpaths")]
    excluded = config.getini("norecursedirs")
    files = [p for top in testpaths for p in top.rglob("*.py")
             if any(fnmatch.fnmatch(p.name, pattern) for pattern in config.getini("python_files"))]
    assert any(p.parent.name == "prepare" for p in files)
    left_out = [str(p.relative_to(root)) for p in files
                if any(fnmatch.fnmatch(folder, pattern) for folder in
                       p.parent.relative_to(root).parts for pattern in excluded)]
    assert not left_out, f"norecursedirs {excluded} leaves out {left_out}"


def test_every_wing_is_a_package_with_its_purpose():
    for wing in WINGS:
        init = PACKAGE / wing / "__init__.py"
        assert init.is_file(), f"tfcdisc/{wing} has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"tfcdisc/{wing}: no purpose"


def test_no_tracked_source_file_is_ignored_by_git():
    """`build/` in .gitignore hid tfcdisc/build/: a new file there never showed in git
    status, and linters that follow .gitignore skipped the wing."""
    import subprocess
    root = PACKAGE.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listed.returncode:  # not a git checkout (an sdist): nothing to compare
        return
    tracked = [p for p in listed.stdout.decode().split("\0") if p]
    sources = [p for p in tracked if p.endswith((".py", ".cfg", ".toml", ".md", ".ipynb"))]
    probes = sources + [str(pathlib.Path(p).parent / "new_module.py") for p in sources]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root,
                             input="\n".join(probes), capture_output=True, text=True).stdout
    assert not ignored.split(), f"ignored by .gitignore: {ignored.split()[:5]}"


def test_only_the_metadata_module_reads_the_datasets_metadata():
    """Five readers once kept their own keys and defaults (one raised a bare KeyError):
    `prepare.metadata` writes and reads it, everything else asks it."""
    owner = PACKAGE / "prepare" / "metadata.py"
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tfds_builder").rglob("*.py")]
    readers = [str(p.relative_to(PACKAGE.parent)) for p in sources
               if p != owner and "info.metadata" in p.read_text()]
    assert not readers, f"info.metadata read outside tfcdisc/prepare/metadata.py: {readers}"


def test_commands_are_peers_and_wings_run_no_command():
    """evaluate once imported predict (for a path check) and the export library ran
    ``python -m tfcdisc.export`` and parsed its stdout: a command imports only cli and
    the floors below it, and no wing module starts a command."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if _wing(name) is None and name not in ("tfcdisc", "tfcdisc.cli"):
            wrong += [f"{name} imports {i}" for i in _imports(path, modules)
                      if i.startswith("tfcdisc.") and _wing(i) is None and i != "tfcdisc.cli"]
        elif _wing(name) is not None and re.search(r'"-m",\s*f?"tfcdisc\.', path.read_text()):
            wrong.append(f"{name} runs a tfcdisc command in a subprocess")
    assert not wrong, "\n".join(wrong)

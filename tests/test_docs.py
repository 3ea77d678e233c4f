"""The documentation that code can keep true: the flags page equals what the commands
say, and the README stays a front page."""

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _generator():
    spec = importlib.util.spec_from_file_location("generate_flags",
                                                  REPO / "docs" / "generate_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page_rows(page: str, command: str) -> dict:
    section = page.split(f"\n## {command}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `--(\w+)` \| (.*?) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3).replace("\\|", "|"))
    return rows


def _help_rows(text: str) -> dict:
    """``--name: help (default: 'x') (required)`` entries of a --help, wrapped lines
    joined."""
    entries, current = [], None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = [line[4:]]
            entries.append(current)
        elif line.startswith("    ") and current is not None:
            current.append(line.strip())
    rows = {}
    for parts in entries:
        name, rest = " ".join(parts).split(": ", 1)
        if name in ("flagfile", "verbosity"):
            continue
        required = rest.endswith(" (required)")
        rest = rest.removesuffix(" (required)")
        m = re.search(r" \(default: '(.*)'\)$", rest)
        default = "required" if required else (f"`{m.group(1)}`" if m else "")
        rows[name] = (default, " ".join((rest[:m.start()] if m else rest).split()))
    return rows


def test_the_flags_page_is_generated_from_the_settings():
    assert _generator().render() == (REPO / "docs" / "flags.md").read_text(), \
        "docs/flags.md is stale: run python docs/generate_flags.py"


@pytest.mark.parametrize("command", _generator().COMMANDS)
def test_the_flags_page_says_what_each_commands_help_says(command):
    page = (REPO / "docs" / "flags.md").read_text()
    done = subprocess.run([sys.executable, "-m", f"tfcdisc.{command}", "--help"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert _page_rows(page, command) == _help_rows(done.stdout)


def test_the_readme_is_a_front_page_that_links_what_it_left_out():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (REPO / link).is_file(), link
    for page in ("architecture", "real_data", "tpus_and_backends", "reliability", "flags",
                 "troubleshooting"):
        assert f"(docs/{page}.md" in readme, page

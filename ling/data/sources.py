"""Named text sources through Hugging Face `datasets`: bundled corpora, local files, saved datasets, hub names.

Every source becomes a `datasets.Dataset` with one string column `text`, one document per row;
chat data (a column of messages) is rendered to text by the tokenizer's chat template. Problems
(missing files, an empty dataset, a wrong field name, a hub name while offline) are reported at
setup as one `DataError` sentence naming the source.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import datasets

from ling.data.bundled import BUNDLED, bundled_documents
from ling.data.errors import DataError

FORMATS = ("auto", "bundled", "json", "parquet", "text", "disk", "hub")
_BLANK_LIMIT = 4096  # bytes; a larger file is taken to hold documents
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


@dataclass
class SourceSpec:
    """Where a source's documents come from.

    path: a bundled corpus (shakespeare, pydoc, arithmetic), a file, a folder or glob of
        json/jsonl/parquet/txt files, a folder written by `Dataset.save_to_disk`, or a hub dataset name.
    format: how to read `path` (auto: bundled name, saved dataset, or by file extension, else hub).
    text_field: the column holding one document per row.
    messages_field: a column of chat messages [{role, content}, ...] to render with the tokenizer's
        chat template instead of `text_field`.
    split: the split to read from saved datasets and hub datasets.
    subset: the hub dataset's configuration name.
    sample_by: for text files, one document per file ("document"), per blank-line paragraph or per line.
    max_documents: keep only the first N documents.
    loss: which tokens of a chat source are trained: "all", or "assistant" for the assistant replies
        only (content and turn end; not the role headers, the system or the user turns).
    """

    path: str
    format: str = "auto"
    text_field: str = "text"
    messages_field: str | None = None
    split: str = "train"
    subset: str | None = None
    sample_by: str = "document"
    max_documents: int | None = None
    loss: str = "all"


def _files(name: str, path: str) -> list[Path]:
    target = Path(path)
    if target.is_file():
        return [target]
    if target.is_dir():
        found = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in _EXTENSIONS)
    else:
        found = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    if not found:
        raise DataError(f"source {name!r}: no json, jsonl, parquet, txt or md files found at {path!r}; check the path.")
    return found


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (only small files are read to tell)."""
    if path.stat().st_size > _BLANK_LIMIT:
        return False
    return not path.read_bytes().strip()


def _format_of(name: str, spec: SourceSpec) -> str:
    if spec.format not in FORMATS:
        raise DataError(f"source {name!r}: format={spec.format!r} is not one of {', '.join(FORMATS)}.")
    if spec.format != "auto":
        return spec.format
    if spec.path in BUNDLED:
        return "bundled"
    target = Path(spec.path)
    if target.is_dir() and ((target / "state.json").is_file() or (target / "dataset_dict.json").is_file()):
        return "disk"
    if target.exists() or any(ch in spec.path for ch in "*?["):
        formats = {_EXTENSIONS.get(p.suffix) for p in _files(name, spec.path)}
        if None in formats or len(formats) > 1:
            raise DataError(
                f"source {name!r}: the files at {spec.path!r} mix or lack known extensions "
                f"({', '.join(_EXTENSIONS)}); put one kind of file per source or set its format."
            )
        return formats.pop()
    if spec.path.startswith((".", "/", "~")):
        raise DataError(f"source {name!r}: {spec.path!r} does not exist.")
    return "hub"


def _load(name: str, spec: SourceSpec, kind: str) -> datasets.Dataset:
    if kind == "bundled":
        return datasets.Dataset.from_dict({"text": bundled_documents(spec.path)})
    if kind == "disk":
        loaded = datasets.load_from_disk(spec.path)
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise DataError(
                    f"source {name!r}: the saved dataset at {spec.path!r} has no split {spec.split!r} "
                    f"(it has {', '.join(loaded)})."
                )
            loaded = loaded[spec.split]
        return loaded
    if kind == "hub":
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(
                f"source {name!r}: {spec.path!r} is not a local path, and hub datasets cannot be downloaded "
                "while HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; give a local path or go online."
            )
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    found = _files(name, spec.path)
    # A file with nothing in it holds no documents (and the json and parquet readers fail on it).
    files = [str(p) for p in found if not _is_blank(p)]
    if not files:
        what = (
            f"{str(found[0])!r} is empty" if len(found) == 1 else f"all {len(found)} files at {spec.path!r} are empty"
        )
        raise DataError(f"source {name!r}: {what}; add documents or point the source at other files.")
    kwargs = {"sample_by": spec.sample_by} if kind == "text" else {}
    if kind == "text" and spec.sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"source {name!r}: sample_by={spec.sample_by!r} is not one of document, paragraph, line.")
    try:
        return datasets.load_dataset(kind, data_files=files, split="train", **kwargs)
    except Exception as err:  # any failure to parse user files becomes one sentence naming them
        cause = err.__cause__ or err
        detail = f"{type(cause).__name__}: {cause}".strip().rstrip(":")
        raise DataError(f"source {name!r}: cannot read {spec.path!r} as {kind} ({detail}).") from None


def load_source(name: str, spec: SourceSpec) -> datasets.Dataset:
    """The source's documents as a Dataset, checked for a usable text or messages column."""
    kind = _format_of(name, spec)
    data = _load(name, spec, kind)
    field = spec.messages_field or spec.text_field
    if field not in data.column_names:
        raise DataError(
            f"source {name!r} has no column {field!r}; its columns are {', '.join(data.column_names)} "
            f"(set {'messages_field' if spec.messages_field else 'text_field'})."
        )
    feature = data.features[field]
    text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if spec.messages_field is None and not text:
        raise DataError(f"source {name!r}: column {field!r} holds {feature}, not text.")
    if spec.max_documents is not None:
        data = data.select(range(min(spec.max_documents, len(data))))
    if len(data) == 0:
        raise DataError(f"source {name!r} at {spec.path!r} has no documents.")
    return data

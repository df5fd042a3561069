"""Sources through HF datasets: local formats read back exactly, chat rendering, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from ling.data.errors import DataError
from ling.data.sources import SourceSpec, load_source
from ling.data.tokenize import cache_key
from ling.data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]

DOCS = ["first document\nwith two lines", "second", "third one, the last"]


def texts(spec, name="s"):
    return list(load_source(name, spec)["text"])


def test_json_jsonl_parquet_and_saved_datasets(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:1]})}).save_to_disk(str(tmp_path / "dd"))
    assert texts(SourceSpec(str(tmp_path / "a.jsonl"))) == DOCS
    assert list(load_source("b", SourceSpec(str(tmp_path / "b.json"), text_field="body"))["body"]) == DOCS
    assert texts(SourceSpec(str(tmp_path / "c.parquet"))) == DOCS
    assert texts(SourceSpec(str(tmp_path / "saved"))) == DOCS
    assert texts(SourceSpec(str(tmp_path / "dd"))) == DOCS[:1]
    assert texts(SourceSpec(str(tmp_path / "a.jsonl"), max_documents=2)) == DOCS[:2]


def test_text_folders_and_globs(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.txt").write_text("para one\n\npara two\n")
    (folder / "sub" / "2.txt").write_text("another book\n")
    assert texts(SourceSpec(str(folder))) == ["para one\n\npara two\n", "another book\n"]
    assert texts(SourceSpec(str(folder / "1.txt"), sample_by="paragraph")) == ["para one", "para two\n"]
    assert texts(SourceSpec(str(tmp_path / "books/**/*.txt"))) == ["para one\n\npara two\n", "another book\n"]


def test_bundled_sources():
    docs = texts(SourceSpec("arithmetic"))
    assert len(docs) == 20000 and docs[0].startswith("Q: ")
    assert key(SourceSpec("arithmetic")) == key(SourceSpec("arithmetic"))


def key(spec: SourceSpec) -> str:
    return cache_key(load_source("s", spec), ByteTokenizer(), "text", False)


def test_the_cache_key_follows_the_documents_and_is_the_same_in_another_process(tmp_path):
    """A rank or a later run reads the tokenised cache of an unchanged source (its key is the same in every
    process, for bundled, file and saved sources alike); a source file that changed gets a new key."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    specs = [SourceSpec("pydoc"), SourceSpec(str(tmp_path / "a.jsonl")), SourceSpec(str(tmp_path / "saved")),
             SourceSpec(str(tmp_path / "a.jsonl"), max_documents=2)]  # fmt: skip
    here = [key(spec) for spec in specs]
    assert len(set(here)) == len(here)
    script = (
        "import sys; from ling.data.sources import SourceSpec, load_source; from ling.data.tokenize import cache_key;"
        "from ling.data.tokenizer import ByteTokenizer;"
        f"specs = {[spec.__dict__ for spec in specs]!r};"
        "print(*(cache_key(load_source('s', SourceSpec(**s)), ByteTokenizer(), 'text', False) for s in specs))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.split() == here
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(DOCS)))
    assert key(specs[1]) != here[1] and key(specs[0]) == here[0]


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"source 's': '\./nowhere.jsonl' does not exist"):
        load_source("s", SourceSpec("./nowhere.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="source 's': .*empty.jsonl. is empty"):
        load_source("s", SourceSpec(str(tmp_path / "empty.jsonl")))
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="has no column 'text'; its columns are content"):
        load_source("s", SourceSpec(str(tmp_path / "a.jsonl")))
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="column 'text' holds .*int64.*not text"):
        load_source("s", SourceSpec(str(tmp_path / "n.jsonl")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="cannot read .*bad.jsonl.* as json"):
        load_source("s", SourceSpec(str(tmp_path / "bad.jsonl")))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match="mix or lack known extensions"):
        load_source("s", SourceSpec(str(mixed)))
    with pytest.raises(DataError, match="hub datasets cannot be downloaded while HF_HUB_OFFLINE"):
        load_source("s", SourceSpec("someone/some-corpus"))
    with pytest.raises(DataError, match="format='csv' is not one of"):
        load_source("s", SourceSpec(str(tmp_path / "a.jsonl"), format="csv"))
    with pytest.raises(DataError, match="bundled corpus 'nope' is unknown"):
        load_source("s", SourceSpec("nope", format="bundled"))

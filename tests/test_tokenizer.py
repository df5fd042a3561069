"""Tests for the tokenizer interface: the byte tokenizer, small Hugging Face tokenizers built on the fly
(a Ling-like one with EOS = pad = `<|endoftext|>` as an added token), and every load error."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from ling.data.errors import DataError
from ling.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a mixture of experts routes every token to a few experts",
    "héllo wörld, ünïcode text is tokenized byte by byte",
    "training data is packed into fixed length sequences",
]
TEXTS = [
    "the quick brown fox",
    "héllo wörld — ✓ 漢字",
    "",
    "  leading and trailing spaces  ",
    "line one\nline two\ttab",
    "unseen wordsxyz and 12345",
]
# Ling-like: the end-of-text token is an added token after the base vocabulary, between other added tokens.
ADDED = ["<|role_start|>", "<|endoftext|>", "<|role_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "héllo?"},
    {"role": "assistant", "content": "hi"},
]


def _raw_bpe(extra: tuple[str, ...] = ()) -> RawTokenizer:
    """A byte-level BPE trained on SENTENCES whose post-processor wraps text in EOS (so adding specials shows)."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in (*ADDED, *extra)])
    eos = "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    return tok


def _save_file(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _raw_bpe(extra).save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _save_folder(folder: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    _save_file(folder)
    config = {"eos_token": "<|role_end|>", "pad_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def ling_file(tmp_path) -> Path:
    return _save_file(tmp_path / "ling")


@pytest.fixture
def chat_folder(tmp_path) -> Path:
    return _save_folder(tmp_path / "chat")


def test_byte_tokenizer_keeps_its_ids():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.name, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == ("byte", 256, 256, 257)
    text = "héllo wörld — ✓ 漢字"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode_batch(TEXTS) == [list(t.encode("utf-8")) for t in TEXTS]
    assert tok.encode_batch([]) == []
    assert tok.decode(tok.encode(text) + [256]) == text


def test_byte_chat_template_is_one_role_line_per_message():
    tok = ByteTokenizer()
    assert tok.apply_chat_template(MESSAGES) == "system: be brief\nuser: héllo?\nassistant: hi\n"
    with pytest.raises(DataError, match=r"chat message 1 .* is not a dict with string 'role' and 'content'"):
        tok.apply_chat_template([MESSAGES[0], {"role": "user"}])


def test_byte_fingerprint_is_a_constant_hex_digest():
    fp = ByteTokenizer().fingerprint()
    assert fp == ByteTokenizer().fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_ling_like_tokenizer_counts_added_tokens_and_uses_eos_as_pad(ling_file):
    tok = load_tokenizer(str(ling_file))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    raw = RawTokenizer.from_file(str(ling_file))
    base = raw.get_vocab_size(with_added_tokens=False)
    eos_id = raw.token_to_id("<|endoftext|>")
    assert eos_id == base + 1
    assert tok.vocab_size == len(tok.hf_tokenizer) == base + len(ADDED) > tok.hf_tokenizer.vocab_size
    assert tok.eos_token_id == tok.pad_token_id == eos_id
    assert tok.name == str(ling_file)


@pytest.mark.parametrize("which", ["file", "folder"])
def test_encoding_matches_the_backend_without_special_tokens(which, ling_file, chat_folder):
    path = ling_file if which == "file" else chat_folder
    tok = load_tokenizer(str(path))
    oracle = RawTokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    expected = [oracle.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert tok.encode_batch(TEXTS) == expected
    assert [tok.encode(t) for t in TEXTS] == expected
    # The backend's own post-processor would wrap the text in EOS; the interface must not.
    wrap = oracle.token_to_id("<|endoftext|>")
    assert oracle.encode(TEXTS[0]).ids == [wrap, *expected[0], wrap]
    assert tok.encode_batch([]) == []


def test_decode_round_trips_and_drops_special_tokens(ling_file):
    tok = load_tokenizer(str(ling_file))
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_token_id]) == text


def test_folder_takes_eos_pad_and_chat_template_from_its_config(chat_folder):
    tok = load_tokenizer(str(chat_folder))
    raw = RawTokenizer.from_file(str(chat_folder / "tokenizer.json"))
    assert tok.eos_token_id == raw.token_to_id("<|role_end|>")
    assert tok.pad_token_id == raw.token_to_id("<|endoftext|>")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    by_hand = env.from_string(CHAT_TEMPLATE).render(messages=MESSAGES, eos_token="<|role_end|>")
    assert tok.apply_chat_template(MESSAGES) == by_hand
    assert by_hand == "<|system|>be brief<|role_end|>\n<|user|>héllo?<|role_end|>\n<|assistant|>hi<|role_end|>\n"


def test_save_pretrained_folder_loads_like_the_file(tmp_path, ling_file):
    tok = load_tokenizer(str(ling_file))
    tok.hf_tokenizer.chat_template = CHAT_TEMPLATE
    tok.hf_tokenizer.save_pretrained(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert (again.vocab_size, again.eos_token_id, again.pad_token_id) == (
        tok.vocab_size,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert again.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_tokenizer_without_chat_template_is_refused(ling_file, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer .*ling.*tokenizer\.json has no chat template"):
        load_tokenizer(str(ling_file)).apply_chat_template(MESSAGES)
    folder = _save_folder(tmp_path / "plain", template=None)
    with pytest.raises(DataError, match=r"has no chat template"):
        load_tokenizer(str(folder)).apply_chat_template(MESSAGES)


def test_chat_template_errors_become_data_errors(tmp_path):
    folder = _save_folder(tmp_path / "strict", template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"chat template of tokenizer .* rejected the conversation: roles must"):
        load_tokenizer(str(folder)).apply_chat_template(MESSAGES)


def test_fingerprint_is_stable_across_loads_encodes_and_processes(ling_file, chat_folder):
    first = load_tokenizer(str(chat_folder))
    fp = first.fingerprint()
    first.encode_batch(TEXTS)
    assert first.fingerprint() == fp == load_tokenizer(str(chat_folder)).fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    code = (
        "import sys; from ling.data.tokenizer import load_tokenizer; "
        "print(load_tokenizer(sys.argv[1]).fingerprint(), load_tokenizer('byte').fingerprint())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(chat_folder)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [fp, ByteTokenizer().fingerprint()]


def test_fingerprint_changes_with_tokens_template_and_eos(tmp_path, ling_file, chat_folder):
    fps = {
        "file": load_tokenizer(str(ling_file)).fingerprint(),
        "added token": load_tokenizer(str(_save_file(tmp_path / "more", extra=("<|extra|>",)))).fingerprint(),
        "folder": load_tokenizer(str(chat_folder)).fingerprint(),
        "template": load_tokenizer(str(_save_folder(tmp_path / "t2", template=CHAT_TEMPLATE + " "))).fingerprint(),
        "eos": load_tokenizer(str(ling_file), eos_token="<|role_end|>").fingerprint(),
        "byte": ByteTokenizer().fingerprint(),
    }
    assert len(set(fps.values())) == len(fps), fps


@pytest.mark.parametrize("which", ["byte", "file", "folder"])
def test_tokenizers_pickle_and_encode_identically(which, ling_file, chat_folder):
    spec = {"byte": "byte", "file": str(ling_file), "folder": str(chat_folder)}[which]
    tok = load_tokenizer(spec)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert clone.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert (clone.vocab_size, clone.eos_token_id, clone.pad_token_id) == (
        tok.vocab_size,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert clone.fingerprint() == tok.fingerprint()


@pytest.mark.parametrize("eos", ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"])
def test_eos_is_detected_among_well_known_tokens(tmp_path, eos):
    raw = RawTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken("<pad>", special=True), AddedToken(eos, special=True)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_token_id == tok.pad_token_id == 4
    assert tok.vocab_size == 5
    assert tok.encode("hello world nope") == [0, 1, 2]


def test_eos_comes_from_argument_then_config_beside_the_file(ling_file):
    raw = RawTokenizer.from_file(str(ling_file))
    (ling_file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|role_end|>"}}))
    tok = load_tokenizer(str(ling_file))
    assert tok.eos_token_id == tok.pad_token_id == raw.token_to_id("<|role_end|>")
    tok = load_tokenizer(str(ling_file), eos_token="<|role_start|>")
    assert tok.eos_token_id == tok.pad_token_id == raw.token_to_id("<|role_start|>")


def test_eos_argument_overrides_a_folder(chat_folder):
    tok = load_tokenizer(str(chat_folder), eos_token="<|role_start|>")
    raw = RawTokenizer.from_file(str(chat_folder / "tokenizer.json"))
    assert tok.eos_token_id == raw.token_to_id("<|role_start|>")
    assert tok.pad_token_id == raw.token_to_id("<|endoftext|>")  # the folder's own pad is kept


def _no_eos_file(tmp_path: Path) -> Path:
    raw = RawTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.save(str(tmp_path / "noeos.json"))
    return tmp_path / "noeos.json"


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", r"tokenizer '.*nowhere' does not exist; use 'byte', a tokenizer folder or a tokenizer\.json"),
        ("empty folder", r"tokenizer folder .*empty has no tokenizer files; expected one of tokenizer\.json"),
        ("corrupt file", r"tokenizer file .*bad\.json could not be parsed \(.*\); expected a tokenizer\.json"),
        ("corrupt folder", r"tokenizer folder .*badfolder could not be loaded \(.*\); expected files"),
        ("corrupt config", r"tokenizer config .*tokenizer_config\.json is not readable JSON"),
        ("no eos", r"no end-of-text token could be determined for tokenizer .*noeos\.json: .*pass eos_token"),
        ("eos not in vocab", r"EOS token '<nope>' is not in the vocabulary of tokenizer .*'<\|endoftext\|>'"),
        ("pad not in vocab", r"pad token '<pad>' is not in the vocabulary of tokenizer .*tokenizer\.json"),
        ("byte with eos", r"eos_token '</s>' cannot be set for the byte tokenizer"),
    ],
)
def test_load_errors_are_data_errors(tmp_path, ling_file, case, pattern):
    if case == "missing":
        args = (str(tmp_path / "nowhere"),)
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "README.md").write_text("no tokenizer here")
        args = (str(tmp_path / "empty"),)
    elif case == "corrupt file":
        (tmp_path / "bad.json").write_text("{not json")
        args = (str(tmp_path / "bad.json"),)
    elif case == "corrupt folder":
        (tmp_path / "badfolder").mkdir()
        (tmp_path / "badfolder" / "tokenizer.json").write_text('{"version": "1.0"}')
        args = (str(tmp_path / "badfolder"),)
    elif case == "corrupt config":
        (ling_file.parent / "tokenizer_config.json").write_text("{oops")
        args = (str(ling_file),)
    elif case == "no eos":
        args = (str(_no_eos_file(tmp_path)),)
    elif case == "eos not in vocab":
        args = (str(ling_file), "<nope>")
    elif case == "pad not in vocab":
        (ling_file.parent / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
        args = (str(ling_file),)
    else:
        args = ("byte", "</s>")
    with pytest.raises(DataError, match=pattern):
        load_tokenizer(*args)

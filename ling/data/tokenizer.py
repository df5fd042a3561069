"""Tokenizers behind one small interface, so the data pipeline treats the built-in byte tokenizer and any
Hugging Face tokenizer (e.g. Ling's own) alike: batch encoding without special tokens, chat rendering,
the token that ends every training document, and a stable fingerprint to key tokenized-data caches.

`load_tokenizer("byte")` needs no download; `load_tokenizer(path)` reads a local tokenizer folder or a
single `tokenizer.json`. `save_hf_tokenizer` writes either kind as Hugging Face tokenizer files, so a
model folder can ship the tokenizer it was trained with. `transformers` is imported only when a Hugging
Face tokenizer is loaded or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ling.data.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tried in this order when neither `eos_token` nor a tokenizer_config.json names the end-of-text token.
WELL_KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

# Any of these in a folder means it holds a tokenizer that AutoTokenizer may be able to load (what the
# `save_pretrained` of one writes); a model folder with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Files a Hugging Face tokenizer's save_pretrained may write; a stale one left from an earlier tokenizer in
# the same folder (a chat template, a vocab) would be read back with the new one, so writing removes them.
_HF_TOKENIZER_FILES = (
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    `vocab_size` is the number of ids the tokenizer can emit (added tokens included); `encode` and
    `encode_batch` never add BOS/EOS or other special tokens (the packer appends the document end itself);
    `decode` leaves special tokens out; `fingerprint` is a hex digest that changes whenever the ids would.

    `eos_token_id` is the model-facing end (generation stops there; exported configs name it);
    `document_end_id` is the token after every training document: the EOS, or another token where a chat
    tokenizer's EOS ends each turn. `bos_token_id` is None where the tokenizer has no BOS. `to_hf` gives
    the Hugging Face form (written beside exported weights).
    """

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def document_end_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...

    def fingerprint(self) -> str: ...

    def to_hf(self) -> PreTrainedTokenizerBase: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and id 256 is end-of-text and pad; `decode` drops id 256.

    Conversations are rendered as one `role: content` line per message, each ending in a newline, e.g.
    `"user: hi\\nassistant: hello\\n"`.
    """

    name = "byte"
    bos_token_id = None
    eos_token_id = 256
    document_end_id = 256
    pad_token_id = 256  # as in Ling's own tokenizer, EOS doubles as pad and is never masked as padding
    eos_token = "<|endoftext|>"  # the name of id 256 in the Hugging Face form (`to_hf`)
    vocab_size = 257
    # Bump when the ids or the chat format change, so caches keyed by the fingerprint are rebuilt.
    format_version = 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        lines = []
        for i, message in enumerate(messages):
            role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
            if not isinstance(role, str) or not isinstance(content, str):
                raise DataError(
                    f"chat message {i} ({message!r}) is not a dict with string 'role' and 'content'; "
                    "the byte tokenizer renders only plain-text messages."
                )
            lines.append(f"{role}: {content}\n")
        return "".join(lines)

    def chat_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """`apply_chat_template(messages)` cut into pieces, each flagged True where it is an assistant
        message's reply: its content and the newline that ends it, without the `assistant: ` header."""
        self.apply_chat_template(messages)  # the same checks
        segments = []
        for message in messages:
            segments.append((f"{message['role']}: ", False))
            segments.append((f"{message['content']}\n", message["role"] == "assistant"))
        return segments

    def fingerprint(self) -> str:
        return _sha256(f"{type(self).__module__}.{type(self).__qualname__}:v{self.format_version}")

    def to_hf(self) -> PreTrainedTokenizerBase:
        """The same tokenizer as a Hugging Face fast tokenizer.

        A byte-level BPE without merges whose vocabulary is the 256 byte symbols in byte order, so every
        string encodes to its UTF-8 bytes; `<|endoftext|>` is id 256, EOS and pad. Special tokens in the
        text are split into bytes (`split_special_tokens`), as `encode` does, and the chat template renders
        as `apply_chat_template` does.
        """
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RawTokenizer
        from transformers import PreTrainedTokenizerFast

        vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        # No regex split: with no merges the words do not matter, and one word per text drops nothing.
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens([AddedToken(self.eos_token, special=True)])
        assert raw.token_to_id(self.eos_token) == self.eos_token_id
        return PreTrainedTokenizerFast(
            tokenizer_object=raw,
            eos_token=self.eos_token,
            pad_token=self.eos_token,
            split_special_tokens=True,
            clean_up_tokenization_spaces=False,
            chat_template=BYTE_CHAT_TEMPLATE,
        )

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# ByteTokenizer.apply_chat_template as a Jinja template, for the Hugging Face form.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
)


def _byte_symbols() -> list[str]:
    """The printable character that byte-level BPE writes for each byte 0..255, in byte order.

    Bytes that are visible Latin-1 characters stand for themselves; the others (control characters,
    space, soft hyphen, ...) take the code points from 256 upward in byte order.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in visible:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


class HFTokenizer:
    """A Hugging Face fast tokenizer behind the `Tokenizer` interface.

    The wrapped tokenizer must have an EOS token, `eos_token` overrides it, and if it names none one of
    `WELL_KNOWN_EOS_TOKENS` found in its vocabulary is used. Without a pad token, pad = EOS (as in Ling's
    own tokenizer, where `<|endoftext|>` is both). Instances pickle, so `encode_batch` can run in
    `datasets.Dataset.map(..., num_proc=N)` workers.

    The document end (`document_end_id`) is the EOS, except where the tokenizer's own EOS is not one of
    `WELL_KNOWN_EOS_TOKENS` and one of those is in its vocabulary: then the first such. So Ling's chat
    tokenizer, whose EOS `<|role_end|>` ends every turn, ends documents with `<|endoftext|>`, and a
    conversation stays one document. An `eos_token` given here is also the document end.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str = "hf", eos_token: str | None = None) -> None:
        self.name = name
        self.hf_tokenizer = tokenizer
        try:
            backend = tokenizer.backend_tokenizer
        except (AttributeError, NotImplementedError, ValueError):
            backend = None
        if backend is None:
            raise DataError(
                f"tokenizer {name} ({type(tokenizer).__name__}) has no fast `tokenizers` backend; "
                "save it with a tokenizer.json (any fast tokenizer's save_pretrained writes one)."
            )
        explicit = eos_token is not None
        if eos_token is None:
            eos_token = _special_token(tokenizer, "eos_token")
        if eos_token is None:
            eos_token = next((t for t in WELL_KNOWN_EOS_TOKENS if backend.token_to_id(t) is not None), None)
            if eos_token is None:
                raise DataError(
                    f"no end-of-text token could be determined for tokenizer {name}: it names no eos_token and "
                    f"has none of {', '.join(WELL_KNOWN_EOS_TOKENS)}; pass eos_token explicitly."
                )
        _require_in_vocab(tokenizer, eos_token, "EOS", name)
        tokenizer.eos_token = eos_token
        pad_token = _special_token(tokenizer, "pad_token")
        if pad_token is None:
            tokenizer.pad_token = eos_token
        else:
            _require_in_vocab(tokenizer, pad_token, "pad", name)
        self.eos_token_id: int = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.pad_token_id: int = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)
        document_end = eos_token
        if not explicit and eos_token not in WELL_KNOWN_EOS_TOKENS:
            document_end = next((t for t in WELL_KNOWN_EOS_TOKENS if backend.token_to_id(t) is not None), eos_token)
        self.document_end_token: str = document_end
        self.document_end_id: int = backend.token_to_id(document_end)

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def bos_token_id(self) -> int | None:
        bos_token = _special_token(self.hf_tokenizer, "bos_token")
        return None if bos_token is None else self.hf_tokenizer.convert_tokens_to_ids(bos_token)

    def to_hf(self) -> PreTrainedTokenizerBase:
        """The wrapped tokenizer, with the EOS and pad chosen here set on it."""
        return self.hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: documents longer than model_max_length are expected here; the packer splits them.
        out = self.hf_tokenizer(
            list(texts),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return out["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the chat template writes it; with `add_generation_prompt`, followed by the
        header of the assistant reply that would come next."""
        if not self.hf_tokenizer.chat_template:
            raise DataError(
                f"tokenizer {self.name} has no chat template; use a tokenizer whose tokenizer_config.json "
                "(or chat_template.jinja) defines one."
            )
        from jinja2 import TemplateError

        try:
            text = self.hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            raise DataError(f"the chat template of tokenizer {self.name} rejected the conversation: {e}") from e
        return text

    def fingerprint(self) -> str:
        tok = self.hf_tokenizer
        backend = json.loads(tok.backend_tokenizer.to_str())
        # Truncation and padding are switched per call by transformers and never apply to encode_batch.
        backend.pop("truncation", None)
        backend.pop("padding", None)
        state = {
            "class": type(tok).__name__,
            "backend": backend,
            "eos": [tok.eos_token, self.eos_token_id],
            "pad": [tok.pad_token, self.pad_token_id],
            "document_end": [self.document_end_token, self.document_end_id],
            "split_special_tokens": bool(tok.split_special_tokens),
            "chat_template": tok.chat_template,
        }
        return _sha256(json.dumps(state, sort_keys=True, ensure_ascii=False))

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
            f"document_end_id={self.document_end_id})"
        )


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """`bos_token_id`, `eos_token_id` and `pad_token_id` of a tokenizer, None where it has none (the byte
    tokenizer has no BOS), under the names a Hugging Face config uses."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike) -> list[str]:
    """Write `tokenizer` as Hugging Face tokenizer files into `folder`; returns the file names written.

    `AutoTokenizer.from_pretrained(folder)` then encodes as `tokenizer.encode` does (without special
    tokens) and `load_tokenizer(folder)` gives the same ids and special tokens back. The files are written
    beside the folder's own files and renamed into place one by one, so none is ever half-written; tokenizer
    files of an earlier tokenizer in the folder are removed afterwards.
    """
    if not isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        raise DataError(
            f"tokenizer {tokenizer!r} cannot be written as Hugging Face files; use the byte tokenizer or a "
            "Hugging Face tokenizer (load_tokenizer)."
        )
    hf = tokenizer.to_hf()
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target))
    try:
        hf.save_pretrained(str(staging))
        if isinstance(tokenizer, ByteTokenizer):
            # The class name the released Ling folders use, which older transformers versions also know.
            config_file = staging / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        for name in names:
            os.replace(staging / name, target / name)
        for name in _HF_TOKENIZER_FILES:
            if name not in names:
                (target / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def load_tokenizer(spec: str = "byte", eos_token: str | None = None) -> Tokenizer:
    """The tokenizer named by `spec`: "byte", a local tokenizer folder, or a path to a tokenizer.json file.

    A folder is loaded with `AutoTokenizer.from_pretrained(folder, local_files_only=True)`. A tokenizer.json
    file is loaded with `PreTrainedTokenizerFast`; its EOS is `eos_token` if given, else the `eos_token`
    of a tokenizer_config.json beside it, else the first of `WELL_KNOWN_EOS_TOKENS` in its vocabulary (the
    config's `pad_token` and `chat_template`, or a chat_template.jinja beside it, are used too).
    `eos_token` also overrides a folder's EOS, and then also ends every document (see `HFTokenizer` for
    the document end otherwise). Raises `DataError` for anything that cannot be loaded.
    """
    if spec == "byte":
        if eos_token is not None:
            raise DataError(
                f"eos_token {eos_token!r} cannot be set for the byte tokenizer, whose end-of-text is id 256; "
                "leave eos_token unset or load a Hugging Face tokenizer."
            )
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer {spec!r} does not exist; use 'byte', a tokenizer folder or a tokenizer.json file.")
    if path.is_dir():
        return _load_folder(path, spec, eos_token)
    return _load_file(path, spec, eos_token)


def _load_folder(path: Path, name: str, eos_token: str | None) -> HFTokenizer:
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(
            f"tokenizer folder {name} has no tokenizer files; expected one of {', '.join(TOKENIZER_FILES)} "
            "(as written by save_pretrained)."
        )
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        # An empty model config: otherwise AutoTokenizer reads the folder's config.json, whose `auto_map`
        # names remote code (the released Ling folders and this project's exports do; transformers then
        # asks on stdin whether to run it) and whose rope settings transformers' generic config cannot
        # parse. The tokenizer files alone say which tokenizer this is.
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, config=PretrainedConfig()
        )
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON and Rust errors)
        raise DataError(
            f"tokenizer folder {name} could not be loaded ({_first_line(e)}); expected files written by "
            "save_pretrained with a valid tokenizer.json."
        ) from e
    return HFTokenizer(tokenizer, name=name, eos_token=eos_token)


def _load_file(path: Path, name: str, eos_token: str | None) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # the Rust parser raises a bare Exception
        raise DataError(
            f"tokenizer file {name} could not be parsed ({_first_line(e)}); expected a tokenizer.json "
            "saved by the `tokenizers` library."
        ) from e
    config = _read_config(path.with_name("tokenizer_config.json"))
    config_eos = _token_content(config.get("eos_token"))
    if eos_token is None and config_eos is not None:
        # Set on the tokenizer rather than passed on: it is the tokenizer's own EOS, not one chosen by the
        # caller, so a well-known end-of-text token in the vocabulary may still end documents.
        _require_in_vocab(tokenizer, config_eos, "EOS", name)
        tokenizer.eos_token = config_eos
    pad_token = _token_content(config.get("pad_token"))
    if pad_token is not None:
        _require_in_vocab(tokenizer, pad_token, "pad", name)
        tokenizer.pad_token = pad_token
    template = config.get("chat_template")
    if isinstance(template, list):  # the older form: a list of {"name", "template"} entries
        template = {t["name"]: t["template"] for t in template}
    jinja_file = path.with_name("chat_template.jinja")
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if template is not None:
        tokenizer.chat_template = template
    return HFTokenizer(tokenizer, name=name, eos_token=eos_token)


def _require_in_vocab(tokenizer: PreTrainedTokenizerBase, token: str, what: str, name: str) -> None:
    if tokenizer.backend_tokenizer.token_to_id(token) is None:
        added = tokenizer.get_added_vocab()
        examples = sorted(added, key=added.get)[:8]
        raise DataError(
            f"{what} token {token!r} is not in the vocabulary of tokenizer {name}; "
            f"use one of its tokens instead (its added tokens include {examples})."
        )


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer config {path} is not readable JSON ({_first_line(e)}); fix or remove it.") from e
    if not isinstance(config, dict):
        raise DataError(f"tokenizer config {path} holds {type(config).__name__}, not a JSON object; fix or remove it.")
    return config


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_token(tokenizer: PreTrainedTokenizerBase, key: str) -> str | None:
    # Read through special_tokens_map: the attribute itself logs an error when the token is unset.
    value = tokenizer.special_tokens_map.get(key)
    return str(value) if value is not None else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

"""Chat data as Ling's fine-tuning renders it: with Ling's chat tokenizer (EOS `<|role_end|>` ends every
turn, `<|endoftext|>` is pad) a conversation ends `<|role_end|><|endoftext|>` and is one document, and a
chat source can train on the assistant replies only (a `loss_mask` parallel to the ids)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from test_tokenizer import _raw_bpe
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from ling.data.chat import encode_conversations, prefix_segments
from ling.data.datamodule import LingDataModule
from ling.data.errors import DataError
from ling.data.packing import document_ids, document_positions
from ling.data.sources import SourceSpec
from ling.data.tokenize import LOSS_MASK, TokenStream, tokenize_source
from ling.data.tokenizer import ByteTokenizer, load_tokenizer, special_token_ids
from ling.model.model import IGNORE_INDEX

# Ling's chat template in miniature: every turn is a role header, the content and `<|role_end|>`.
LING_TEMPLATE = (
    "{% set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} %}"
    "{% for m in messages %}<role>{{ names[m['role']] }}</role>{{ m['content'] }}<|role_end|>{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the quick brown fox?"},
    {"role": "assistant", "content": "jumps over the lazy dog"},
    {"role": "user", "content": "and then?"},
    {"role": "assistant", "content": "a mixture of experts routes every token"},
]
SECOND = [
    {"role": "user", "content": "héllo wörld"},
    {"role": "assistant", "content": "training data is packed"},
]
# CONVERSATION as the template writes it, cut by hand where the assistant replies begin and end.
PROMPT_1 = (
    "<role>SYSTEM</role>be brief<|role_end|><role>HUMAN</role>the quick brown fox?<|role_end|><role>ASSISTANT</role>"
)
REPLY_1 = "jumps over the lazy dog<|role_end|>"
PROMPT_2 = "<role>HUMAN</role>and then?<|role_end|><role>ASSISTANT</role>"
REPLY_2 = "a mixture of experts routes every token<|role_end|>"


def ling_chat_folder(folder: Path, eos: str = "<|role_end|>", template: str = LING_TEMPLATE) -> Path:
    """A tokenizer folder shaped like Ling's chat/SFT release: a byte-level BPE with `<|endoftext|>`,
    `<|role_end|>`, `<role>` and `</role>` as added tokens, EOS `<|role_end|>`, pad `<|endoftext|>`."""
    folder.mkdir(parents=True)
    _raw_bpe(extra=("<role>", "</role>")).save(str(folder / "tokenizer.json"))
    config = {"eos_token": eos, "pad_token": "<|endoftext|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def chat_tok(tmp_path):
    return load_tokenizer(str(ling_chat_folder(tmp_path / "ling-chat")))


def token_id(tok, token: str) -> int:
    return tok.hf_tokenizer.backend_tokenizer.token_to_id(token)


def conversations(*chats) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"messages": chat} for chat in chats])


def test_the_chat_tokenizer_ends_documents_with_endoftext_and_keeps_its_eos(chat_tok, tmp_path):
    role_end, endoftext = token_id(chat_tok, "<|role_end|>"), token_id(chat_tok, "<|endoftext|>")
    assert (chat_tok.eos_token_id, chat_tok.pad_token_id, chat_tok.document_end_id) == (role_end, endoftext, endoftext)
    # The model-facing EOS (exported config.json and generation config) stays the chat EOS.
    assert special_token_ids(chat_tok)["eos_token_id"] == role_end
    # A tokenizer.json with that config beside it reads the same.
    file_tok = load_tokenizer(str(tmp_path / "ling-chat" / "tokenizer.json"))
    assert (file_tok.eos_token_id, file_tok.document_end_id) == (role_end, endoftext)
    # An EOS given by the caller is the document end too, and the fingerprint tells the two apart.
    explicit = load_tokenizer(str(tmp_path / "ling-chat"), eos_token="<|role_end|>")
    assert explicit.eos_token_id == explicit.document_end_id == role_end
    assert explicit.fingerprint() != chat_tok.fingerprint()
    # The base tokenizer's EOS `<|endoftext|>` is its document end.
    base = load_tokenizer(str(ling_chat_folder(tmp_path / "base", eos="<|endoftext|>")))
    assert base.eos_token_id == base.document_end_id == endoftext
    # Without a well-known end-of-text token in the vocabulary the EOS ends documents.
    raw = RawTokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken("<|role_end|>", special=True)])
    (tmp_path / "plain").mkdir()
    raw.save(str(tmp_path / "plain" / "tokenizer.json"))
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|role_end|>"}))
    plain = load_tokenizer(str(tmp_path / "plain"))
    assert plain.eos_token_id == plain.document_end_id == 2
    byte = ByteTokenizer()
    assert byte.eos_token_id == byte.document_end_id == 256


def test_a_conversation_is_its_rendered_text_then_endoftext(chat_tok, tmp_path):
    (ids,) = tokenize_source("chat", conversations(CONVERSATION), chat_tok, "messages", True, tmp_path)["input_ids"]
    role_end, endoftext = chat_tok.eos_token_id, chat_tok.document_end_id
    assert ids[-2:] == [role_end, endoftext]
    assert ids == chat_tok.encode(chat_tok.apply_chat_template(CONVERSATION)) + [endoftext]
    assert (ids.count(role_end), ids.count(endoftext)) == (len(CONVERSATION), 1)


def test_two_packed_conversations_are_two_documents(chat_tok, tmp_path):
    tokenized = tokenize_source("chat", conversations(CONVERSATION, SECOND), chat_tok, "messages", True, tmp_path)
    first, second = tokenized["input_ids"]
    stream = TokenStream(tokenized, "chat")
    assert not stream.has_loss_mask and stream.read_loss(0, len(stream)).all()
    tokens = torch.from_numpy(stream.read(0, len(stream)))[None]
    assert tokens[0].tolist() == first + second
    end = chat_tok.document_end_id
    # By hand: the first conversation is document 0 up to and with its `<|endoftext|>`, the second document 1;
    # its `<|role_end|>` turn ends start no document.
    assert document_ids(tokens, end)[0].tolist() == [0] * len(first) + [1] * len(second)
    positions = list(range(len(first))) + list(range(len(second)))
    assert document_positions(document_ids(tokens, end))[0].tolist() == positions
    # eod masking by hand: labels are the next tokens, and only the one after a document end is dropped,
    # the second conversation's first token; every turn end and the document ends are predicted.
    inputs, labels = tokens[0, :-1], tokens[0, 1:]
    dropped = torch.nonzero(inputs == end).flatten().tolist()
    assert dropped == [len(first) - 1] and labels[dropped[0]] == second[0]
    kept = labels[inputs != end]
    assert (kept == chat_tok.eos_token_id).sum() == len(CONVERSATION) + len(SECOND) and (kept == end).sum() == 2


def test_assistant_loss_masks_exactly_the_replies_and_their_turn_ends(chat_tok, tmp_path):
    tokenized = tokenize_source(
        "chat", conversations(CONVERSATION, SECOND), chat_tok, "messages", True, tmp_path, loss="assistant"
    )
    assert tokenized.column_names == ["input_ids", LOSS_MASK]
    (ids, second_ids), (mask, second_mask) = tokenized["input_ids"], tokenized[LOSS_MASK]
    enc = chat_tok.encode
    end = chat_tok.document_end_id
    by_hand = [(PROMPT_1, 0), (REPLY_1, 1), (PROMPT_2, 0), (REPLY_2, 1)]
    assert ids == [t for text, _ in by_hand for t in enc(text)] + [end]
    assert mask == [m for text, m in by_hand for _ in enc(text)] + [0]
    # The pieces' ids are the whole rendered text's ids, as without the mask.
    assert ids == enc(chat_tok.apply_chat_template(CONVERSATION)) + [end]
    trained = [t for t, m in zip(ids, mask) if m]
    assert chat_tok.hf_tokenizer.decode(trained) == REPLY_1 + REPLY_2
    assert second_mask == [0] * len(enc("<role>HUMAN</role>héllo wörld<|role_end|><role>ASSISTANT</role>")) + [1] * len(
        enc("training data is packed<|role_end|>")
    ) + [0]
    # The stream reads the mask beside the ids, also across the chunks of a concatenated dataset.
    stream = TokenStream(datasets.concatenate_datasets([tokenized, tokenized]), "chat")
    assert stream.has_loss_mask and len(stream) == 2 * (len(ids) + len(second_ids))
    flat = np.array(2 * (mask + second_mask), dtype=bool)
    assert np.array_equal(stream.read_loss(0, len(stream)), flat)
    seam = len(ids) + len(second_ids)  # where the second copy begins
    assert np.array_equal(stream.read_loss(seam - 3, 6), flat[seam - 3 : seam + 3])
    # Read back from the cache, the same columns.
    again = tokenize_source(
        "chat", conversations(CONVERSATION, SECOND), chat_tok, "messages", True, tmp_path, loss="assistant"
    )
    assert again[LOSS_MASK] == tokenized[LOSS_MASK] and again.cache_files == tokenized.cache_files


def test_a_reply_may_open_the_conversation(chat_tok):
    chat = [{"role": "assistant", "content": "the lazy dog"}, *SECOND]
    (ids,), (mask,) = encode_conversations(chat_tok, [chat])
    opening = chat_tok.encode("<role>ASSISTANT</role>")
    assert ids[: len(opening)] == opening and mask[: len(opening)] == [0] * len(opening)
    reply = chat_tok.encode("the lazy dog<|role_end|>")
    assert ids[len(opening) : len(opening) + len(reply)] == reply
    assert mask[len(opening) : len(opening) + len(reply)] == [1] * len(reply)
    assert ids == chat_tok.encode(chat_tok.apply_chat_template(chat)) + [chat_tok.document_end_id]


def test_the_byte_tokenizer_masks_replies_without_their_header(tmp_path):
    byte = ByteTokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (ids,), (mask,) = encode_conversations(byte, [chat])
    assert ids == list(b"user: hi\nassistant: hello\n") + [256]
    assert mask == [0] * len(b"user: hi\nassistant: ") + [1] * len(b"hello\n") + [0]
    # Without the option a conversation is tokenised as before: its text, then EOS.
    (plain,) = tokenize_source("byte-chat", conversations(chat), byte, "messages", True, tmp_path)["input_ids"]
    assert plain == ids


def test_templates_that_do_not_render_prefixes_as_prefixes_are_refused(tmp_path):
    # A template that closes the conversation only after its last turn.
    closing = LING_TEMPLATE + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"
    tok = load_tokenizer(str(ling_chat_folder(tmp_path / "closing", template=closing)))
    with pytest.raises(DataError, match=r"source 'sft': the chat template does not render prefixes as prefixes: "
                       r"the text of messages\[:2\] does not begin with that of messages\[:1\] "
                       r"\(message 1, role 'user'\).*use loss='all'"):  # fmt: skip
        tokenize_source("sft", conversations(CONVERSATION), tok, "messages", True, tmp_path, loss="assistant")
    # The whole conversation is still usable with loss="all".
    (ids,) = tokenize_source("sft", conversations(CONVERSATION), tok, "messages", True, tmp_path)["input_ids"]
    assert ids[-2:] == [tok.document_end_id] * 2
    # A generation prompt other than the header the assistant turns are written with.
    other = LING_TEMPLATE.replace(
        "{% if add_generation_prompt %}<role>ASSISTANT", "{% if add_generation_prompt %}<role>BOT"
    )
    tok = load_tokenizer(str(ling_chat_folder(tmp_path / "other", template=other)))
    with pytest.raises(DataError, match=r"source 'sft': .* the text of messages\[:3\] does not begin with that of "
                       r"messages\[:2\] with the generation prompt \(message 2, role 'assistant'\)"):  # fmt: skip
        encode_conversations(tok, [CONVERSATION], "sft")
    with pytest.raises(DataError, match=r"source 's': .*prefixes as prefixes"):
        prefix_segments(lambda m, add_generation_prompt: str(len(m)), CONVERSATION, "s")


def test_loss_settings_are_checked(chat_tok, tmp_path):
    text = datasets.Dataset.from_dict({"text": ["a b c"]})
    with pytest.raises(DataError, match=r"source 'web': loss='assistant' needs a chat source \(set messages_field\)"):
        tokenize_source("web", text, chat_tok, cache_dir=tmp_path, loss="assistant")
    with pytest.raises(DataError, match=r"source 'chat': loss='replies' is not one of all, assistant"):
        tokenize_source("chat", conversations(SECOND), chat_tok, "messages", True, tmp_path, loss="replies")


# ---- the data module ---------------------------------------------------------------------------------
WORDS = "the quick brown fox jumps over lazy dog a mixture of experts routes every token to few".split()


def random_chats(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def say() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randrange(3, 9)))

    chats = []
    for i in range(count):
        chat = [{"role": "system", "content": say()}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            chat += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        chats.append(chat)
    return chats


def expected_labels(stream: TokenStream, offset: int, seq_len: int, end: int) -> list[int]:
    """By hand: the next tokens, dropped where untrained (the mask) or after a document end."""
    window = stream.read(offset, seq_len + 1)
    keep = stream.read_loss(offset, seq_len + 1)[1:] & (window[:-1] != end)
    return np.where(keep, window[1:], IGNORE_INDEX).tolist()


def test_the_data_module_keeps_conversations_whole_and_trains_the_replies(tmp_path):
    ling_chat_folder(tmp_path / "tok")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in random_chats(60)))
    texts = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(60)]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = LingDataModule(
        sources={
            "sft": SourceSpec(str(tmp_path / "sft.jsonl"), messages_field="messages", loss="assistant"),
            "web": {"path": str(tmp_path / "web.jsonl")},
        },
        tokenizer=str(tmp_path / "tok"),
        seq_len=16,
        micro_batch_size=4,
        global_batch_size=16,
        val_fraction=0.2,
        val_batches=2,
        document_isolation=True,
        cache_dir=str(tmp_path / "cache"),
    )
    data.setup("fit")
    tok, T = data.tokenizer, 16
    end, role_end = tok.document_end_id, tok.eos_token_id
    sft, web = (rows.stream for rows in data.train_rows)
    assert sft.has_loss_mask and not web.has_loss_mask and 0.2 < sft.read_loss(0, len(sft)).mean() < 0.8
    chats = sft.read(0, len(sft))
    assert (chats == end).sum() == 60 and (chats == role_end).sum() > 120  # one document per conversation
    seen_turn_end = False
    for step in range(3):
        batch = data.step_batch(step, 0)
        rows = zip(*(batch[k].reshape(-1, T) for k in ("input_ids", "labels", "doc_ids", "position_ids")))
        for inputs, labels, doc, pos in rows:
            # The row's place in its source: the one offset, a multiple of seq_len, where its inputs are.
            (stream,) = [s for s in (sft, web) if any(_at(s, inputs, k * T) for k in range(len(s) // T))]
            (k,) = [k for k in range(len(stream) // T) if _at(stream, inputs, k * T)]
            assert labels.tolist() == expected_labels(stream, k * T, T, end)
            # Documents restart only after `<|endoftext|>`, never after a turn's `<|role_end|>`.
            starts = [0] + [i + 1 for i, t in enumerate(inputs.tolist()[:-1]) if t == end]
            assert sorted(set(torch.nonzero(pos == 0).flatten().tolist())) == starts
            assert doc.tolist() == document_ids(inputs[None], end)[0].tolist()
            seen_turn_end |= bool((inputs[:-1] == role_end).any())
    assert seen_turn_end
    # Validation windows are consecutive from each source's split, masked the same way.
    offsets = [split for _, split in data.val_streams]
    for batch in data.val_dataloader():
        stream, _ = data.val_streams[batch["source"]]
        for inputs, labels in zip(batch["input_ids"], batch["labels"]):
            offset = offsets[batch["source"]]
            assert inputs.tolist() == stream.read(offset, T).tolist()
            assert labels.tolist() == expected_labels(stream, offset, T, end)
            offsets[batch["source"]] += T
    assert offsets == [split + 2 * 4 * T for _, split in data.val_streams]


def _at(stream: TokenStream, inputs: torch.Tensor, offset: int) -> bool:
    return offset + len(inputs) < len(stream) and np.array_equal(stream.read(offset, len(inputs)), inputs.numpy())

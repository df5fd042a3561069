"""Conversations as training documents, with a loss mask that keeps only the assistant replies.

A conversation is rendered by the tokenizer's own chat template and cut into consecutive pieces by
rendering its prefixes: the reply of assistant message i is

    render(messages[:i + 1])  minus  render(messages[:i], add_generation_prompt=True),

that is the message's content and whatever the template writes to end the turn (Ling's `<|role_end|>`),
without the role header the generation prompt writes (`<role>ASSISTANT</role>`). Everything else (system
and user turns, every header) is context. The pieces are encoded one after another and joined, so the ids
and the 0/1 mask line up by construction; the document end follows, with mask 0.
"""

from __future__ import annotations

from collections.abc import Callable

from ling.data.errors import DataError
from ling.data.tokenizer import ByteTokenizer

# What a chat source trains on: every token, or the assistant replies only.
LOSSES = ("all", "assistant")

_PROBE = "\ue000reply\ue000"  # a stand-in content no template alters (private-use characters, no spaces)

Segment = tuple[str, bool]  # a piece of the rendered conversation, and whether it is an assistant reply


def prefix_segments(render: Callable[..., str], messages: list[dict], source: str = "source") -> list[Segment]:
    """`render(messages)` cut into pieces at every message, assistant replies flagged True.

    `render(messages, add_generation_prompt=...)` is a chat template. It must write each prefix of the
    conversation as a prefix of the whole (turns only append); a `DataError` naming `source` says where
    it does not.
    """
    segments: list[Segment] = []
    done, shown = "", "nothing"  # render(messages[:i]) so far, and what it renders
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant":
            head = render(messages[:i], add_generation_prompt=True) if i else _first_header(render, message, source)
            what = f"messages[:{i}] with the generation prompt" if i else "the header of message 0"
            _require_prefix(done, shown, head, what, source, i, role)
            segments.append((head[len(done) :], False))
            done, shown = head, what
        full = render(messages[: i + 1], add_generation_prompt=False)
        _require_prefix(done, shown, full, f"messages[:{i + 1}]", source, i, role)
        segments.append((full[len(done) :], role == "assistant"))
        done, shown = full, f"messages[:{i + 1}]"
    return segments


def _first_header(render: Callable[..., str], message: dict, source: str) -> str:
    """The header of a reply that opens the conversation: chat templates render no empty conversation (so
    no generation prompt alone), but the text before a stand-in reply is the header."""
    probe = render([{**message, "content": _PROBE}], add_generation_prompt=False)
    if _PROBE not in probe:
        raise DataError(
            f"source {source!r}: the chat template does not write an assistant message's content as given, so "
            "where the reply that opens a conversation begins is unknown; use loss='all' for this source."
        )
    return probe[: probe.index(_PROBE)]


def _require_prefix(prefix: str, before: str, text: str, what: str, source: str, index: int, role: object) -> None:
    if not text.startswith(prefix):
        raise DataError(
            f"source {source!r}: the chat template does not render prefixes as prefixes: the text of {what} "
            f"does not begin with that of {before} (message {index}, role {role!r}); assistant-only loss "
            "needs a template that only appends turns, so use loss='all' for this source."
        )


def chat_segments(tokenizer, messages: list[dict], source: str = "source") -> list[Segment]:
    """The conversation's pieces: the byte tokenizer's own `chat_segments`, else `prefix_segments` over the
    tokenizer's `apply_chat_template`."""
    try:
        if isinstance(tokenizer, ByteTokenizer):
            return tokenizer.chat_segments(messages)
        return prefix_segments(tokenizer.apply_chat_template, messages, source)
    except DataError as e:
        raise _named(e, source) from e


def encode_conversations(tokenizer, conversations: list[list[dict]], source: str = "source") -> tuple[list, list]:
    """(ids, loss masks) per conversation: the pieces' ids joined, then the document end; the mask is 1
    on assistant replies (content and turn end) and 0 elsewhere, the document end included."""
    pieces = [chat_segments(tokenizer, messages, source) for messages in conversations]
    encoded = iter(tokenizer.encode_batch([text for segments in pieces for text, _ in segments]))
    end = tokenizer.document_end_id
    all_ids, all_masks = [], []
    for segments in pieces:
        ids, mask = [], []
        for _, trained in segments:
            part = next(encoded)
            ids += part
            mask += [int(trained)] * len(part)
        all_ids.append([*ids, end])
        all_masks.append([*mask, 0])
    return all_ids, all_masks


def render_conversation(tokenizer, messages: list[dict], source: str = "source") -> str:
    """The conversation as the tokenizer's chat template writes it, errors naming the source."""
    try:
        return tokenizer.apply_chat_template(messages)
    except DataError as e:
        raise _named(e, source) from e


def _named(error: DataError, source: str) -> DataError:
    text = str(error)
    return error if text.startswith(f"source {source!r}") else DataError(f"source {source!r}: {text}")

"""Packing keeps every token once and in order; document isolation cuts a row into independent documents."""

import datasets
import numpy as np
import torch

from ling.data.packing import SourceRows, document_ids, document_positions
from ling.data.tokenize import TokenStream
from ling.model.masks import document_causal_mask

EOS = 256


def test_every_token_is_a_label_exactly_once_in_order():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    stream = [1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8, 9, 10, EOS, 11, EOS]
    tokens = TokenStream(datasets.Dataset.from_dict({"input_ids": [doc + [EOS] for doc in docs]}))
    source = SourceRows("s", tokens, end=len(tokens))
    assert source.count(4) == 3
    rows, _ = source.rows(np.arange(3), seq_len=4, key=0)
    rows = rows[np.argsort(rows[:, 0])]  # one epoch in a shuffled order; these rows start with rising tokens
    labels = rows[:, 1:].flatten().tolist()
    assert labels == stream[1:13]  # the tail that does not fill a row is dropped
    assert rows[:, :-1].flatten().tolist() == stream[:12]
    assert SourceRows("s", TokenStream(datasets.Dataset.from_dict({"input_ids": [[1, EOS]]})), end=2).count(8) == 0


def test_document_ids_positions_and_mask_by_hand():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, 8]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert document_positions(document_ids(ids, EOS)).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = document_causal_mask(document_ids(ids, EOS))[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_isolated_document_logits_do_not_depend_on_the_previous_document(tiny_model):
    tiny_model.eval()
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (1, 9), generator=gen)
    other_first = torch.randint(0, 256, (1, 9), generator=gen)
    second = torch.randint(0, 256, (1, 7), generator=gen)

    def isolated(prefix):
        row = torch.cat([prefix, torch.tensor([[EOS]]), second], dim=1)
        docs = document_ids(row, EOS)
        with torch.no_grad():
            out = tiny_model(row, position_ids=document_positions(docs), attn_mask=document_causal_mask(docs))
        return out.logits[:, -second.shape[1] :]

    with torch.no_grad():
        alone = tiny_model(second).logits
    torch.testing.assert_close(isolated(first), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(isolated(other_first), alone, rtol=1e-5, atol=1e-5)
    # Without isolation the second document does see the first.
    row = torch.cat([first, torch.tensor([[EOS]]), second], dim=1)
    with torch.no_grad():
        shared = tiny_model(row).logits[:, -second.shape[1] :]
    assert not torch.allclose(shared, alone, atol=1e-3)

"""Tests for the companion files of an exported Hugging Face folder: the tokenizer written as Hugging Face
files (checked against the project's own encoding and the raw `tokenizers` backend), generation_config.json,
the special-token ids and `auto_map` in config.json, and loading through transformers' Auto classes with a
stand-in remote-code module that declares the released key layout."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_tokenizer import _raw_bpe as raw_bpe
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, dynamic_module_utils

import ling
from ling.checkpoint import CheckpointError, load_pretrained, save_pretrained
from ling.checkpoint.companions import write_companions
from ling.config import ConfigError, LingConfig
from ling.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, save_hf_tokenizer, special_token_ids
from ling.model import build_model

HUB = "inclusionAI/Ling-mini-2.0"
LOCAL_MAP = {
    "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
    "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
}
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "",
    " ",
    "  two leading spaces and trailing  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "héllo wörld, ünïcode, façade, Ångström",
    "漢字かなカナ한국어 中文句子。",
    "emoji 😀 👩‍👩‍👧 🇨🇭 and a variation selector ✌️",
    "\x00\x01\x7f control bytes and \u00ad a soft hyphen",
    "a literal <|endoftext|> stays text",
    "".join(chr(c) for c in range(256)),
]


def _sample_texts(n: int = 40) -> list[str]:
    """Random strings over the whole Unicode range (surrogates aside), for breadth beyond TEXTS."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 24)):
            c = rng.choice(
                [rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF)] * 2
                + [rng.randint(0x10000, 0x10FFFF)]
            )
            chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")
        out.append("".join(chars))
    return out


def _small_hf_tokenizer(tmp_path: Path) -> HFTokenizer:
    """A byte-level BPE with Ling-like special tokens: BOS, an end-of-turn EOS and a separate pad."""
    folder = tmp_path / "source-tokenizer"
    folder.mkdir()
    raw_bpe(extra=("<|startoftext|>",)).save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|role_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer)
    return tok


# ---- the tokenizer as Hugging Face files ------------------------------------------------------
def test_byte_tokenizer_files_encode_and_decode_as_the_byte_tokenizer(tmp_path):
    byte = ByteTokenizer()
    written = save_hf_tokenizer(byte, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(written)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (None, 256, 256, 257)
    texts = TEXTS + _sample_texts()
    for text in texts:
        expected = list(text.encode("utf-8"))
        assert byte.encode(text) == expected
        # add_special_tokens=True too: the byte tokenizer adds none, and neither may its Hugging Face form.
        for add in (False, True):
            assert hf(text, add_special_tokens=add)["input_ids"] == expected, text
        assert hf.decode(expected) == text
    assert hf(texts, add_special_tokens=False)["input_ids"] == byte.encode_batch(texts)
    assert hf.decode([104, 105, 256], skip_special_tokens=True) == byte.decode([104, 105, 256]) == "hi"
    messages = [{"role": "user", "content": "héllo\nthere"}, {"role": "assistant", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False) == byte.apply_chat_template(messages)
    # load_tokenizer reads the folder back with the same ids and special tokens.
    again = load_tokenizer(str(tmp_path))
    expected_ids = {"bos_token_id": None, "eos_token_id": 256, "pad_token_id": 256}
    assert special_token_ids(again) == special_token_ids(byte) == expected_ids
    assert again.encode_batch(texts) == byte.encode_batch(texts)


def test_hf_tokenizer_files_encode_as_the_backend(tmp_path):
    tok = _small_hf_tokenizer(tmp_path)
    oracle = RawTokenizer.from_file(str(tmp_path / "source-tokenizer" / "tokenizer.json"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ stale }}")  # from an earlier tokenizer: must go
    save_hf_tokenizer(tok, out)
    assert not (out / "chat_template.jinja").exists()
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    expected = {
        "bos_token_id": oracle.token_to_id("<|startoftext|>"),
        "eos_token_id": oracle.token_to_id("<|role_end|>"),
        "pad_token_id": oracle.token_to_id("<|endoftext|>"),
    }
    assert len(set(expected.values())) == 3
    assert special_token_ids(tok) == expected
    assert {k: getattr(hf, k) for k in expected} == expected
    texts = TEXTS + _sample_texts(10)
    oracle_ids = [oracle.encode(t, add_special_tokens=False).ids for t in texts]
    assert hf(texts, add_special_tokens=False)["input_ids"] == oracle_ids
    again = load_tokenizer(str(out))
    assert special_token_ids(again) == expected
    assert again.fingerprint() == tok.fingerprint()


def test_a_tokenizer_without_a_hugging_face_form_is_refused(tmp_path):
    class Plain:
        eos_token_id = pad_token_id = 0

        def __repr__(self) -> str:
            return "Plain()"

    with pytest.raises(ValueError, match=r"tokenizer Plain\(\) cannot be written as Hugging Face files"):
        save_hf_tokenizer(Plain(), tmp_path)


# ---- a model folder ---------------------------------------------------------------------------
STANDIN_CONFIG = """
from transformers import PretrainedConfig


class BailingMoeV2Config(PretrainedConfig):
    model_type = "bailing_moe"
    standin = True
"""

# Declares the released key layout (Ling 2.0 reference, section 3) from the config shapes, nothing more.
STANDIN_MODELING = """
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_bailing_moe_v2 import BailingMoeV2Config


def _linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


class Norm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class MLP(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj, self.up_proj = _linear(hidden, inner), _linear(hidden, inner)
        self.down_proj = _linear(inner, hidden)


class Gate(nn.Module):
    def __init__(self, hidden, experts):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, hidden))
        self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        shared = getattr(c, "moe_shared_expert_intermediate_size", None)
        shared = shared or c.moe_intermediate_size * c.num_shared_experts
        self.gate = Gate(c.hidden_size, c.num_experts)
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size) for _ in range(c.num_experts))
        self.shared_experts = MLP(c.hidden_size, shared)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        self.query_key_value = _linear(c.hidden_size, heads * c.head_dim)
        self.dense = _linear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.query_layernorm, self.key_layernorm = Norm(c.head_dim), Norm(c.head_dim)


class Layer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = Norm(c.hidden_size), Norm(c.hidden_size)
        self.attention = Attention(c)
        self.mlp = MoE(c) if i >= c.first_k_dense_replace else MLP(c.hidden_size, c.intermediate_size)
        if i >= c.num_hidden_layers:
            self.enorm, self.hnorm, self.final_layernorm = Norm(c.hidden_size), Norm(c.hidden_size), Norm(c.hidden_size)
            self.eh_proj = _linear(2 * c.hidden_size, c.hidden_size)


class BailingMoeV2PreTrainedModel(PreTrainedModel):
    config_class = BailingMoeV2Config
    base_model_prefix = "model"

    def _init_weights(self, module):
        pass


class BailingMoeV2Model(BailingMoeV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        count = config.num_hidden_layers + getattr(config, "num_nextn_predict_layers", 0)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(count))
        self.norm = Norm(config.hidden_size)
        self.post_init()


class BailingMoeV2ForCausalLM(BailingMoeV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = BailingMoeV2Model(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids):
        return self.lm_head(self.model.norm.weight * self.model.word_embeddings(input_ids))
"""


@pytest.fixture
def standin_code(tmp_path) -> Path:
    folder = tmp_path / "standin-code"
    folder.mkdir()
    (folder / "configuration_bailing_moe_v2.py").write_text(textwrap.dedent(STANDIN_CONFIG))
    (folder / "modeling_bailing_moe_v2.py").write_text(textwrap.dedent(STANDIN_MODELING))
    (folder / "notes.txt").write_text("not code")
    return folder


@pytest.fixture
def modules_cache(tmp_path, monkeypatch) -> Path:
    """transformers copies remote code into its modules cache: use a fresh one, never the user's."""
    cache = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(cache))
    for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
        monkeypatch.delitem(sys.modules, name)
    return cache


def _export(folder: Path, tokenizer=None, remote_code=None, config_changes=None) -> dict:
    torch.manual_seed(0)
    save_pretrained(build_model(ling.preset("tiny")), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes or {})
    updated = write_companions(folder, config, tokenizer=tokenizer, remote_code=remote_code)
    (folder / "config.json").write_text(json.dumps(updated, indent=2))
    return config


def test_exported_folder_loads_offline_through_the_auto_classes(tmp_path, standin_code, modules_cache):
    tok = _small_hf_tokenizer(tmp_path)
    folder = tmp_path / "exported-model"
    before = _export(folder, tokenizer=tok, remote_code=standin_code)
    assert "bos_token_id" not in before and before["eos_token_id"] == 256  # the tiny preset's ids

    config = json.loads((folder / "config.json").read_text())
    ids = special_token_ids(tok)
    assert {k: config[k] for k in ids} == ids
    assert config["auto_map"] == LOCAL_MAP
    assert {p.name for p in folder.glob("*.py")} == {"configuration_bailing_moe_v2.py", "modeling_bailing_moe_v2.py"}
    generation = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == tuple(ids.values())
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == tuple(ids.values())
    assert hf_tok("héllo wörld", add_special_tokens=False)["input_ids"] == tok.encode("héllo wörld")

    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    assert type(hf_config).__name__ == "BailingMoeV2Config" and hf_config.standin
    assert hf_config.eos_token_id == ids["eos_token_id"]
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, local_files_only=True, output_loading_info=True
    )
    assert type(model).__name__ == "BailingMoeV2ForCausalLM"
    assert Path(type(model).__module__.replace(".", "/")).parts[0] == "transformers_modules"
    assert any(modules_cache.rglob("modeling_bailing_moe_v2.py"))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    on_disk = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(on_disk)
    for key, tensor in on_disk.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert state["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert on_disk["model.layers.1.mlp.experts.3.up_proj.weight"].abs().sum() > 0  # real weights, not init zeros

    # The project's own loader reads the completed folder too.
    loaded = load_pretrained(folder)
    assert loaded.config.eos_token_id == ids["eos_token_id"]


def test_without_local_code_auto_map_names_the_hub_repository(tmp_path, monkeypatch):
    folder = tmp_path / "hub-model"
    _export(folder, tokenizer=ByteTokenizer(), config_changes={"bos_token_id": 1, "eos_token_id": 5})
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {k: f"{HUB}--{v}" for k, v in LOCAL_MAP.items()}
    assert not list(folder.glob("*.py"))
    assert "bos_token_id" not in config  # the byte tokenizer has none
    assert (config["eos_token_id"], config["pad_token_id"]) == (256, 256)
    assert json.loads((folder / "generation_config.json").read_text()) == {"eos_token_id": 256, "pad_token_id": 256}
    assert AutoTokenizer.from_pretrained(str(folder), local_files_only=True)("hé")["input_ids"] == [104, 195, 169]

    # transformers reads the reference as "code of that repository": record what it would fetch.
    fetched = []

    def fake_cached_module_file(repo_id, module_file, **kwargs):
        fetched.append((repo_id, module_file))
        return module_file

    class FetchedConfig(transformers.PretrainedConfig):
        model_type = "bailing_moe"

    monkeypatch.setattr(dynamic_module_utils, "get_cached_module_file", fake_cached_module_file)
    monkeypatch.setattr(dynamic_module_utils, "get_class_in_module", lambda name, module, **kw: FetchedConfig)
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    assert isinstance(hf_config, FetchedConfig)
    assert fetched == [(HUB, "configuration_bailing_moe_v2.py")]


def test_without_a_tokenizer_the_config_ids_are_kept(tmp_path):
    folder = tmp_path / "no-tokenizer"
    config = _export(folder)
    assert not (folder / "tokenizer.json").exists()
    written = json.loads((folder / "config.json").read_text())
    assert (written["eos_token_id"], written["pad_token_id"]) == (config["eos_token_id"], config["pad_token_id"])
    assert json.loads((folder / "generation_config.json").read_text()) == {"eos_token_id": 256, "pad_token_id": 256}


def test_write_companions_does_not_touch_config_json_or_its_argument(tmp_path):
    config = {"vocab_size": 512, "eos_token_id": 7, "auto_map": {"AutoTokenizer": "x.Y"}}
    updated = write_companions(tmp_path, config, tokenizer=ByteTokenizer())
    assert not (tmp_path / "config.json").exists()
    assert config == {"vocab_size": 512, "eos_token_id": 7, "auto_map": {"AutoTokenizer": "x.Y"}}
    assert updated["auto_map"]["AutoTokenizer"] == "x.Y"  # other entries are kept
    assert updated["auto_map"]["AutoModelForCausalLM"] == f"{HUB}--{LOCAL_MAP['AutoModelForCausalLM']}"


def test_a_list_valued_eos_is_kept_when_it_holds_the_tokenizer_eos(tmp_path):
    tok = _small_hf_tokenizer(tmp_path)
    ids = special_token_ids(tok)
    listed = [ids["pad_token_id"], ids["eos_token_id"]]
    kept = write_companions(tmp_path / "a", {"vocab_size": 512, "eos_token_id": listed}, tokenizer=tok)
    assert kept["eos_token_id"] == listed
    assert json.loads((tmp_path / "a" / "generation_config.json").read_text())["eos_token_id"] == listed
    other = write_companions(tmp_path / "b", {"vocab_size": 512, "eos_token_id": [0, 1]}, tokenizer=tok)
    assert other["eos_token_id"] == ids["eos_token_id"]


def test_list_valued_eos_round_trips_through_ling_config(tmp_path):
    released = {**LingConfig().to_hf(), "eos_token_id": [156892, 156895]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(released))
    config = LingConfig.from_json_file(path)
    assert config.eos_token_id == [156892, 156895]
    assert config.to_hf() == released
    (tmp_path / "again.json").write_text(json.dumps(config.to_hf()))
    assert json.loads((tmp_path / "again.json").read_text())["eos_token_id"] == [156892, 156895]
    assert LingConfig(eos_token_id=3).eos_token_id == 3 and LingConfig(eos_token_id=None).eos_token_id is None
    for bad in ([156892, 157184], [], [True], -1):
        with pytest.raises(ConfigError, match=r"eos_token_id=.* must be a token id or a non-empty list of them"):
            LingConfig(eos_token_id=bad)
    with pytest.raises(ConfigError, match=r"pad_token_id=\[1\] must be a token id within the vocabulary"):
        LingConfig(pad_token_id=[1])


def test_remote_code_must_hold_both_bailing_files(tmp_path, standin_code):
    (standin_code / "modeling_bailing_moe_v2.py").unlink()
    for where in (standin_code, tmp_path / "absent", standin_code / "configuration_bailing_moe_v2.py"):
        with pytest.raises(CheckpointError, match=r"remote_code=.* is not a folder holding configuration_bailing"):
            write_companions(tmp_path / "out", {"vocab_size": 512}, remote_code=where)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"the tokenizer emits 257 ids but the model's vocab_size is 200"):
        write_companions(tmp_path, {"vocab_size": 200}, tokenizer=ByteTokenizer())
    with pytest.raises(CheckpointError, match=r"hub_repo='Ling-mini' is not a hub repository name"):
        write_companions(tmp_path, {"vocab_size": 512}, hub_repo="Ling-mini")


def test_an_exported_folder_with_auto_map_reads_back_its_tokenizer_without_remote_code(tmp_path, capfd):
    """config.json names remote code in auto_map; reading the tokenizer must neither run it nor ask about it
    (transformers would ask on stdin whether to run it)."""
    model = build_model(ling.preset("tiny"))
    yarn = model.config.replace(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024})
    save_pretrained(model, tmp_path, config=yarn, tokenizer=ByteTokenizer())  # rope settings as HFExport writes
    assert "auto_map" in json.loads((tmp_path / "config.json").read_text())
    capfd.readouterr()
    text = "héllo, wörld\n"
    assert load_tokenizer(str(tmp_path)).encode(text) == ByteTokenizer().encode(text)
    out, err = capfd.readouterr()
    assert "custom code" not in out + err

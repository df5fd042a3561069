"""`eval.LingLM` against direct model computations: loglikelihood, rolling windows, generation, loading
(HF folder, .ckpt, DCP), lm-eval's registry and evaluator, two ranks with expert parallelism, and
the one-sentence errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # eval/ is used from the checkout, like callbacks/
    sys.path.insert(0, str(ROOT))

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from eval import EvalError, LingLM  # noqa: E402
from ling import preset  # noqa: E402
from ling.checkpoint import CheckpointError, save_pretrained  # noqa: E402
from ling.data.tokenizer import BYTE_CHAT_TEMPLATE, ByteTokenizer  # noqa: E402
from ling.generate import generate  # noqa: E402
from ling.model import build_model  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*assuming the intent is to save in a single process.*"),
    # transformers reading the config.json beside a tokenizer; nothing of ours uses the field that way.
    pytest.mark.filterwarnings("ignore:.*rope_scaling. is deprecated.*:FutureWarning"),
]
BYTES = ByteTokenizer()
EOS = BYTES.eos_token_id


@pytest.fixture
def model(tiny_model):
    """The tiny random model with a head that only ever prefers printable ASCII, so its greedy text is
    varied and decodes to exactly the bytes it generated."""
    with torch.no_grad():
        printable = torch.zeros(tiny_model.config.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        tiny_model.lm_head.weight[~printable] = 0.0
        tiny_model.lm_head.weight[printable] *= 50.0
    return tiny_model.eval()


def make_lm(model, **kwargs):
    return LingLM(model=model, ling_tokenizer=BYTES, **kwargs)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def gen_requests(items):
    return [Instance("generate_until", {}, item, i) for i, item in enumerate(items)]


def rolling_requests(texts):
    return [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]


# ---- oracles: the model called directly ------------------------------------------------------------
def logprobs_of(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 from one forward of the whole sequence (row of floats)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return F.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def direct_ll(model, context, continuation):
    """(sum log p(continuation | context), greedy?) by hand, bytes as ids, EOS for an empty context."""
    moved = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces to the continuation
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    ctx = BYTES.encode(context) or [EOS]
    cont = BYTES.encode(continuation)
    ids = ctx + cont
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    rows = logits[len(ctx) - 1 : len(ids) - 1]
    total = float(F.log_softmax(rows, dim=-1).gather(1, torch.tensor(cont)[:, None]).sum())
    return total, rows.argmax(-1).tolist() == cont


PAIRS = [
    ("The cat", " sat on the mat"),  # a leading space in the continuation
    ("", "hello"),  # empty context: EOS conditions the first byte
    ("Question: 2+2? Answer: ", "4"),  # trailing space moved into the continuation
    ("x", "a much longer multi-token continuation, with punctuation."),
    ("naïve café", " über"),  # multibyte characters
    ("The cat", " sat"),  # shares its context with the first pair
    ("The cat", " s"),  # a one-token continuation of the same context
]


def test_model_names_are_registered():
    assert get_model("ling") is LingLM and get_model("bailing_moe_v2") is LingLM


def test_loglikelihood_equals_the_direct_computation(model):
    got = make_lm(model, batch_size=8).loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    for pair, (logprob, greedy) in zip(PAIRS, got, strict=True):
        expected, expected_greedy = direct_ll(model, *pair)
        assert logprob == pytest.approx(expected, abs=1e-4), pair
        assert greedy == expected_greedy
    assert len({round(logprob, 3) for logprob, _ in got}) == len(PAIRS) and max(got)[0] < -1  # real numbers


def test_batch_sizes_agree(model):
    requests = ll_requests(PAIRS * 2)  # 14 requests of mixed lengths: batches of 8 and 6 rows
    one = make_lm(model, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    eight = make_lm(model, batch_size=8).loglikelihood(requests, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(one, eight, strict=True):
        assert abs(a - b) < 1e-5 and ga == gb


def test_is_greedy_for_the_models_own_continuation(model):
    lm = make_lm(model)
    context = BYTES.encode("Once upon a time")
    own = generate(model, torch.tensor([context]), 6)[0]
    assert len(own) == 6 and all(32 <= t < 127 for t in own)
    [(logprob, greedy)] = lm._loglikelihood_tokens([(None, context, own)])
    assert greedy and logprob == pytest.approx(float(logprobs_of(model, context + own)[-6:].sum()), abs=1e-4)
    other = own[:3] + [own[3] + 1 if own[3] < 126 else 33] + own[4:]
    [(_, greedy)] = lm._loglikelihood_tokens([(None, context, other)])
    assert not greedy
    text = BYTES.decode(context), BYTES.decode(own)
    [(_, greedy)] = lm.loglikelihood(ll_requests([text]), disable_tqdm=True)
    assert greedy


def test_long_contexts_are_left_truncated_to_max_length(model):
    lm = make_lm(model, max_length=16, batch_size=2)
    context, continuation = "abcdefghijklmnopqrstuvwxyz0123456789", "XYZ"
    [(logprob, _), (short, _)] = lm.loglikelihood(ll_requests([(context, continuation), ("ab", "c")]), True)
    ids = BYTES.encode(context + continuation)[-17:]  # the last max_length + 1 tokens
    assert logprob == pytest.approx(float(logprobs_of(model, ids)[-3:].sum()), abs=1e-4)
    assert short == pytest.approx(direct_ll(model, "ab", "c")[0], abs=1e-4)
    full = direct_ll(model, context, continuation)[0]
    assert abs(full - logprob) > 1e-3  # the truncation made a difference


def test_add_bos_token_prefixes_bos(model):
    class WithBos(ByteTokenizer):
        bos_token_id = 1  # a control byte standing in for a BOS token

    lm = LingLM(model=model, ling_tokenizer=WithBos(), add_bos_token=True)
    assert lm.prefix_token_id == 1 and lm.tok_encode("ab") == [1, 97, 98] and lm.tok_encode("ab", False) == [97, 98]
    [(empty, _), (with_context, _)] = lm.loglikelihood(ll_requests([("", "ab"), ("x", "ab")]), disable_tqdm=True)
    assert empty == pytest.approx(float(logprobs_of(model, [1, 97, 98]).sum()), abs=1e-4)
    assert with_context == pytest.approx(float(logprobs_of(model, [1, 120, 97, 98])[1:].sum()), abs=1e-4)
    assert make_lm(model, add_bos_token=True).prefix_token_id == EOS  # the byte tokenizer has no BOS


def test_empty_continuation_scores_zero(model):
    lm = make_lm(model)
    assert lm._loglikelihood_tokens([(("a", ""), [97], [])]) == [(0.0, True)]


# ---- rolling loglikelihood --------------------------------------------------------------------------
def test_rolling_equals_the_full_sequence_when_it_fits(model):
    text = "It was the best of times, it was the worst of times."
    lm = make_lm(model, batch_size=4)
    [rolling] = lm.loglikelihood_rolling(rolling_requests([text]), disable_tqdm=True)
    expected = float(logprobs_of(model, [EOS, *BYTES.encode(text)]).sum())
    assert rolling == pytest.approx(expected, abs=1e-4)
    [(as_continuation, _)] = lm.loglikelihood(ll_requests([("", text)]), disable_tqdm=True)
    assert rolling == pytest.approx(as_continuation, abs=1e-4)
    assert lm.loglikelihood_rolling(rolling_requests([""]), disable_tqdm=True) == [0.0]


def test_rolling_windows_by_hand(model):
    """max_length 8 over 20 bytes: byte j is scored once, in the window of the (up to) 8 ids that end just
    before the last byte of its chunk of 8; the first window starts with EOS."""
    text = "abcdefghijKLMNOPQRST"
    tokens, max_len = BYTES.encode(text), 8
    seq = [EOS, *tokens]  # tokens[j] is seq[j + 1]
    expected = 0.0
    for start, stop in [(0, 8), (8, 16), (16, 20)]:  # the chunks of predicted tokens
        first = max(0, stop - max_len)
        window = seq[first : stop + 1]  # ids seq[first .. stop]: inputs seq[first .. stop - 1]
        scores = logprobs_of(model, window)  # scores[i] is log p(window[i + 1] | window[: i + 1])
        expected += float(scores[start - first : stop - first].sum())  # tokens[j] is window[j + 1 - first]
    lm = make_lm(model, max_length=max_len, batch_size=3)
    [rolling] = lm.loglikelihood_rolling(rolling_requests([text]), disable_tqdm=True)
    assert rolling == pytest.approx(expected, abs=1e-4)
    full = float(logprobs_of(model, seq).sum())
    assert abs(rolling - full) > 1e-3  # the windows lost context, so the sums differ


# ---- generation ------------------------------------------------------------------------------------
def free_run(model, prompt, steps, **kwargs):
    return BYTES.decode(generate(model, torch.tensor([BYTES.encode(prompt)]), steps, stop_tokens=[EOS], **kwargs)[0])


def test_greedy_generation_equals_ling_generate(model):
    prompts = ["The cat sat", "Hello there", "abc", "The dog ran"]  # lengths 11, 11, 3, 11
    lm = make_lm(model, batch_size=4)
    got = lm.generate_until(gen_requests([(p, {"until": [], "max_gen_toks": 12}) for p in prompts]), True)
    assert got == [free_run(model, p, 12) for p in prompts]
    assert all(len(text) == 12 for text in got)  # max_gen_toks ends each row; only the continuation returned


def test_generation_stops_at_stop_strings(model):
    prompt = "The cat sat"
    text = free_run(model, prompt, 30)
    stop = text[9]  # a character a few tokens in (it may also occur earlier)
    two_chars = text[4:6]
    lm = make_lm(model, max_gen_toks=30)
    got = lm.generate_until(
        gen_requests(
            [
                (prompt, {"until": [stop]}),
                (prompt, {"until": ["never", two_chars]}),
                (prompt, {"until": "never", "max_gen_toks": 5}),
            ]
        ),  # fmt: skip
        disable_tqdm=True,
    )
    assert got == [text[: text.index(stop)], text[: text.index(two_chars)], text[:5]]
    assert len(got[1]) < 30


def test_generation_leaves_room_for_max_gen_toks(model):
    lm = make_lm(model, max_length=24)
    prompt = "A fairly long prompt that exceeds the window"
    [got] = lm.generate_until(gen_requests([(prompt, {"until": [], "max_gen_toks": 8})]), disable_tqdm=True)
    assert got == free_run(model, prompt[-16:], 8)  # 24 - 8 prompt tokens kept, from the left


def test_seeded_sampling_equals_ling_generate(model):
    lm = make_lm(model)
    kwargs = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 2.0, "seed": 7}
    [a] = lm.generate_until(gen_requests([("Hello", kwargs)]), disable_tqdm=True)
    [b] = lm.generate_until(gen_requests([("Hello", kwargs | {"seed": 8})]), disable_tqdm=True)
    assert a == free_run(model, "Hello", 10, temperature=2.0, generator=torch.Generator().manual_seed(7))
    assert a != b and a != free_run(model, "Hello", 10)


def test_generation_errors_are_one_sentence(model):
    lm = make_lm(model, max_length=16)
    with pytest.raises(EvalError, match=r"max_gen_toks=16 leaves no room for a prompt within max_length=16"):
        lm.generate_until(gen_requests([("a", {"max_gen_toks": 16})]), disable_tqdm=True)
    with pytest.raises(EvalError, match=r"'num_beams' are not supported by the ling model; use until, "):
        lm.generate_until(gen_requests([("a", {"until": [], "num_beams": 2})]), disable_tqdm=True)


# ---- chat --------------------------------------------------------------------------------------------
def test_chat_template_of_the_byte_tokenizer(model):
    lm = make_lm(model)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert lm.apply_chat_template(chat) == "user: hi\nassistant: hello\n"
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == "user: hi\nassistant: hello"
    assert lm.chat_template(True) == BYTE_CHAT_TEMPLATE and lm.chat_template(False) is None


# ---- loading -----------------------------------------------------------------------------------------
def lightning_checkpoint(model, tokenizer=True):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    ling = {"config": model.config.to_hf()} | ({"tokenizer": {"name": "byte"}} if tokenizer else {})
    return state, ling


def write_ckpt(path, model, tokenizer=True):
    """A .ckpt in the LingModule format: the module's state dict, plus its config and tokenizer."""
    state, ling = lightning_checkpoint(model, tokenizer)
    torch.save({"epoch": 0, "global_step": 2, "state_dict": state, "ling": ling}, path)
    return path


def write_dcp(folder, model):
    """A sharded checkpoint as ModelParallelStrategy(save_distributed_checkpoint=True) writes it."""
    folder.mkdir(parents=True)
    state, ling = lightning_checkpoint(model)
    dcp.save({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 2, "ling": ling}, folder / "meta.pt")
    return folder


@pytest.mark.parametrize("kind", ["hf", "ckpt", "dcp"])
def test_loaded_checkpoints_score_like_the_live_model(tmp_path, model, kind):
    if kind == "hf":
        path = save_pretrained(model, tmp_path / "hf", tokenizer=BYTES)
    elif kind == "ckpt":
        path = write_ckpt(tmp_path / "last.ckpt", model)
    else:
        path = write_dcp(tmp_path / "dcp", model)
    loaded = LingLM(pretrained=str(path), batch_size=4)
    assert loaded.eot_token_id == EOS and loaded.max_length == model.config.context_length
    assert not loaded.model.training and next(loaded.model.parameters()).dtype == torch.float32
    expected = make_lm(model).loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    got = loaded.loglikelihood(ll_requests(PAIRS), disable_tqdm=True)
    assert [round(a, 4) for a, _ in got] == [round(b, 4) for b, _ in expected]


def test_from_arg_string_with_dtype_and_tokenizer_override(tmp_path, model):
    path = write_ckpt(tmp_path / "last.ckpt", model, tokenizer=False)
    lm = LingLM.create_from_arg_string(
        f"pretrained={path},tokenizer=byte,dtype=bfloat16,max_length=64,max_gen_toks=4",
        {"batch_size": "3", "max_batch_size": None, "device": "cpu"},
    )
    assert lm.batch_size == 3 and lm.max_length == 64 and lm.max_gen_toks == 4
    weights = lm.model.model.layers[1].mlp
    assert weights.experts.gate_proj.dtype == torch.bfloat16 and weights.gate.expert_bias.dtype == torch.float32
    [(logprob, _)] = lm.loglikelihood(ll_requests([("The cat", " sat")]), disable_tqdm=True)
    assert logprob == pytest.approx(direct_ll(model, "The cat", " sat")[0], rel=0.05)


def test_simple_evaluate_on_a_local_task(tmp_path, model):
    """lm-eval's evaluator end to end: the accuracy of a two-choice task equals the hand count."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = [{"q": "The cat", "choices": [" sat", " flew"], "answer": 0},
            {"q": "2 + 2 =", "choices": [" 4", " 5"], "answer": 1},
            {"q": "Hello", "choices": [" world", " there"], "answer": 0}]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(docs))
    (tmp_path / "pick.yaml").write_text(
        textwrap.dedent(f"""\
        task: pick
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "data.json"}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list: [{{metric: acc}}]
        metadata: {{version: 1.0}}
        """)
    )
    out = simple_evaluate(
        model=make_lm(model, batch_size=4), tasks=["pick"], bootstrap_iters=0, log_samples=False,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )  # fmt: skip
    picks = [max(range(2), key=lambda c: direct_ll(model, d["q"], d["choices"][c])[0]) for d in docs]
    assert out["results"]["pick"]["acc,none"] == pytest.approx(sum(p == d["answer"] for p, d in zip(picks, docs)) / 3)


# ---- errors ------------------------------------------------------------------------------------------
def test_unknown_model_args_list_the_valid_keys():
    with pytest.raises(EvalError, match=r"unknown model_args key\(s\) 'foo' for the ling model; valid keys are "
                                        r"pretrained, tokenizer, dtype, device, batch_size"):  # fmt: skip
        LingLM.create_from_arg_string("pretrained=/nowhere,foo=1")


def test_bad_inputs_are_one_sentence(tmp_path, model, monkeypatch):
    import eval.lm

    def no_weights(*args):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr(eval.lm, "load_weights", no_weights)
    with pytest.raises(EvalError, match=r"pretrained='.*missing' does not exist; pass a Hugging Face folder"):
        LingLM(pretrained=str(tmp_path / "missing"))
    bare = save_pretrained(model, tmp_path / "bare")
    with pytest.raises(EvalError, match=r"has no tokenizer files \(none of tokenizer.json.*\); pass tokenizer="):
        LingLM(pretrained=str(bare))
    with pytest.raises(EvalError, match=r"checkpoint .* records no tokenizer; pass tokenizer="):
        LingLM(pretrained=str(write_ckpt(tmp_path / "a.ckpt", model, tokenizer=False)))
    with pytest.raises(CheckpointError, match=r"is not a readable torch checkpoint"):
        LingLM(pretrained=str(tmp_path / "bare" / "config.json"))
    with pytest.raises(EvalError, match=r"='fp64' is not a dtype name; use one of auto, float32, bfloat16, float16\."):
        LingLM(pretrained=str(bare), tokenizer="byte", dtype="fp64")
    with pytest.raises(EvalError, match=r"batch_size='auto' is not supported"):
        LingLM(pretrained=str(bare), tokenizer="byte", batch_size="auto")
    with pytest.raises(EvalError, match=r"max_length=4096 exceeds the 2048 positions"):
        LingLM(pretrained=str(bare), tokenizer="byte", max_length=4096)
    with pytest.raises(EvalError, match=r"exactly one of pretrained= .* or model= .*, not both"):
        LingLM(pretrained=str(bare), model=model)
    small = build_model(preset("tiny").replace(vocab_size=200, eos_token_id=0, pad_token_id=0))
    with pytest.raises(EvalError, match=r"the tokenizer has 257 tokens but the model's vocab_size is 200"):
        make_lm(small)
    with pytest.raises(EvalError, match=r"the tokenizer has 257 tokens but the model's vocab_size is 200"):
        LingLM(pretrained=str(save_pretrained(small, tmp_path / "small")), tokenizer="byte")


# ---- two ranks, expert parallel ----------------------------------------------------------------------
WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from eval import LingLM
from lm_eval.api.instance import Instance
from ling import preset
from ling.data.tokenizer import ByteTokenizer
from ling.model import build_model
from ling.parallel import ParallelDims, ParallelPlan, build_mesh, parallelize

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = build_model(preset("tiny")).eval()
model.load_state_dict(torch.load({state!r}, weights_only=True))
parallelize(model, build_mesh(ParallelDims(dp_shard=2, ep=2), "cpu"), ParallelPlan(param_dtype=None))
torch.manual_seed(100 + rank)  # unseeded sampling must still agree: rank 0's tokens are broadcast
lm = LingLM(model=model, ling_tokenizer=ByteTokenizer(), batch_size=3)
assert lm.rank == 0 and lm.world_size == 1 and lm.global_rank == rank
pairs = [("The cat", " sat"), ("", "hello"), ("x", " a longer one"), ("The cat", " s")]
out = dict(
    ll=lm.loglikelihood([Instance("loglikelihood", {{}}, p, i) for i, p in enumerate(pairs)], True),
    rolling=lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {{}}, ("some text",), 0)], True),
    gen=lm.generate_until([Instance("generate_until", {{}}, (p, {{"until": ["q"], "max_gen_toks": 9,
                                                                 "do_sample": True}}), i)
                           for i, p in enumerate(["ab", "cd", "The cat"])], True),
)
torch.save(out, {out!r} + f".{{rank}}")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_with_expert_parallelism_compute_everything_alike(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "state.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), state=str(tmp_path / "state.pt"), out=str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    assert ranks[0]["gen"] == ranks[1]["gen"] and all(len(t) > 0 for t in ranks[0]["gen"])
    single = make_lm(model, batch_size=3)
    pairs = [("The cat", " sat"), ("", "hello"), ("x", " a longer one"), ("The cat", " s")]
    expected = single.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    for out in ranks:
        assert [round(a, 4) for a, _ in out["ll"]] == [round(b, 4) for b, _ in expected]
        assert [g for _, g in out["ll"]] == [g for _, g in expected]
        assert out["rolling"][0] == pytest.approx(
            single.loglikelihood_rolling(rolling_requests(["some text"]), True)[0], abs=1e-4
        )

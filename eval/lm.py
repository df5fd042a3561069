"""`LingLM`: Ling models in lm-evaluation-harness (loglikelihood, rolling loglikelihood, generate_until).

Registered as the lm-eval models `ling` and `bailing_moe_v2`. It either loads a checkpoint
(`pretrained=` a Hugging Face folder, a Lightning .ckpt file or a sharded DCP folder) or evaluates a
live `LingForCausalLM` in place (`model=` + `ling_tokenizer=`, e.g. from a training callback, where
the model may be FSDP2 / expert-parallel sharded).

Token handling follows lm-eval's HFLM: contexts are left-truncated to `max_length` (to leave room for
`max_gen_toks` when generating), an empty context is replaced by the prefix token (EOS, or BOS with
`add_bos_token`), requests are length-sorted and batched with lm-eval's `Collator`, and rolling
loglikelihoods use lm-eval's disjoint windows of `max_length` tokens.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from eval._load import EvalError, check_vocab, parse_device, resolve, tokenizer_for, torch_dtype
from eval._load import load as load_weights
from ling.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, special_token_ids
from ling.generate import first_stop, generate

__all__ = ["EvalError", "LingLM", "MODEL_ARGS"]

# The keys `--model_args` may set (lm-eval passes them to __init__ as keyword arguments).
MODEL_ARGS = (
    "pretrained",
    "tokenizer",
    "dtype",
    "device",
    "batch_size",
    "max_length",
    "add_bos_token",
    "max_gen_toks",
)
# Generation keys a task's generation_kwargs may use (after lm-eval's normalize_gen_kwargs).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EvalError(f"{what}={value!r} is not valid; use a positive integer.")
    return value


@register_model("ling", "bailing_moe_v2")
class LingLM(TemplateLM):
    """A Ling model behind lm-eval's LM interface.

    pretrained: a Hugging Face folder (its tokenizer files are used unless `tokenizer` is given), a
    Lightning .ckpt file or a sharded DCP checkpoint folder (the tokenizer the run recorded, unless
    `tokenizer`). tokenizer: "byte", a tokenizer folder or a tokenizer.json. dtype: auto (as saved),
    float32, bfloat16 or float16. device: where a pretrained model is loaded (a live model stays where
    it is). max_length: the window for scoring and prompt + generation (default: the positions the
    model's rope settings reach). max_gen_toks: the default number of new tokens per request.
    model / ling_tokenizer: a live LingForCausalLM and its ling tokenizer, evaluated in place (no copy,
    no dtype or train/eval change; every call runs without gradients and keeps no KV cache).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        batch_size: int | str = 1,
        max_length: int | None = None,
        add_bos_token: bool = False,
        max_gen_toks: int = 256,
        *,
        model=None,
        ling_tokenizer=None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (model is None):
            raise EvalError(
                "LingLM needs exactly one of pretrained= (a checkpoint path) or model= (a live LingForCausalLM), "
                f"not {'both' if model is not None else 'neither'}."
            )
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise EvalError(
                f"batch_size={batch_size!r} is not supported (every rank must batch alike); use a positive integer."
            )
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        if not isinstance(add_bos_token, bool):
            raise EvalError(f"add_bos_token={add_bos_token!r} is not valid; use true or false.")
        self.add_bos_token = add_bos_token
        dtype_ = torch_dtype(dtype)

        if model is not None:
            from ling.model import LingForCausalLM

            if not isinstance(model, LingForCausalLM):
                raise EvalError(f"model= must be a ling.model.LingForCausalLM, not {type(model).__name__}.")
            if dtype_ is not None:
                raise EvalError(f"dtype={dtype!r} applies only to pretrained=; a live model= is evaluated as it is.")
            if ling_tokenizer is None and tokenizer is None:
                raise EvalError("model= needs ling_tokenizer= (a ling tokenizer object) or tokenizer= (its spec).")
            if ling_tokenizer is not None and not isinstance(ling_tokenizer, Tokenizer):
                raise EvalError(
                    f"ling_tokenizer={ling_tokenizer!r} is not a ling tokenizer (encode, decode, eos_token_id, ...); "
                    "build one with ling.data.tokenizer.load_tokenizer."
                )
            config = model.config
            self.tokenizer = ling_tokenizer if ling_tokenizer is not None else load_tokenizer(os.fspath(tokenizer))
            check_vocab(self.tokenizer, config)
            self._max_length = self._check_max_length(max_length, config)
            self._model = model
            self._device = next(model.parameters()).device
            self._pretrained = None
            # In a distributed run every rank generates every request; rank 0's tokens are broadcast at
            # each step, so all ranks feed the same tokens and stop at the same step (see `rank`).
            self._broadcast = torch.distributed.is_available() and torch.distributed.is_initialized()
            self._broadcast = self._broadcast and torch.distributed.get_world_size() > 1
        else:
            if ling_tokenizer is not None:
                raise EvalError("ling_tokenizer= goes with model=; with pretrained= pass tokenizer= (a spec) instead.")
            self._device = parse_device(device)
            resolved = resolve(pretrained)
            self.tokenizer = tokenizer_for(resolved, tokenizer)
            check_vocab(self.tokenizer, resolved.config)
            self._max_length = self._check_max_length(max_length, resolved.config)
            self._model = load_weights(resolved, dtype_, self._device)
            self._pretrained = os.fspath(pretrained)
            self._broadcast = False
        self._hf_chat: Any = None

    @staticmethod
    def _check_max_length(max_length: Any, config) -> int:
        if max_length is None:
            return config.context_length
        max_length = _positive_int(max_length, "max_length")
        if max_length > config.context_length:
            raise EvalError(
                f"max_length={max_length} exceeds the {config.context_length} positions the model's rope settings "
                f"reach; use at most {config.context_length}."
            )
        return max_length

    # ---- construction from lm-eval's CLI ---------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LingLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> LingLM:
        """Validate the keys first: a misspelt key would otherwise be a TypeError from deep inside lm-eval."""
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:
            raise EvalError(
                f"unknown model_args key(s) {', '.join(map(repr, unknown))} for the ling model; "
                f"valid keys are {', '.join(MODEL_ARGS)}."
            )
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("max_batch_size", None)  # only meaningful with batch_size=auto, which is rejected anyway
        unknown = sorted(set(extra) - set(MODEL_ARGS))
        if unknown:
            raise EvalError(f"unknown setting(s) {', '.join(map(repr, unknown))} for the ling model.")
        return cls(**(extra | dict(arg_dict)))  # model_args win over the CLI's --batch_size/--device

    # ---- what lm-eval and its users read ---------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return special_token_ids(self.tokenizer)["bos_token_id"]

    @property
    def prefix_token_id(self) -> int:
        if self.add_bos_token and self.bos_token_id is not None:
            return self.bos_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    # lm-eval shards documents by `rank`/`world_size` (islice(docs, rank, limit, world_size)) and gathers
    # metrics to rank 0. Expert all-to-alls and FSDP all-gathers need every rank in every forward, so
    # every rank must see ALL requests: report rank 0 of a world of 1 on every process (as lm-eval's own
    # megatron backend does). A true rank here would make rank r skip its first r documents. evaluate()
    # then computes the full results on every rank, and simple_evaluate returns them wherever LOCAL_RANK
    # is 0; the caller keeps (or broadcasts) those of `global_rank == 0`.
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        """This process's rank in the default process group (0 outside a distributed run)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    @property
    def tokenizer_name(self) -> str:
        name = str(self.tokenizer.name).replace("/", "__")
        return f"{name}-{self.tokenizer.fingerprint()[:16]}"

    def get_model_info(self) -> dict:
        first = next(self._model.parameters())
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(first.dtype),
            "model_pretrained": self._pretrained,
        }

    # ---- tokens ----------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:  # fmt: skip
        """The ids of `string`; BOS first when add_bos_token (add_special_tokens=None) or add_special_tokens."""
        ids = list(self.tokenizer.encode(string))
        with_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.bos_token_id
        if with_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: int | list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else list(tokens))

    # ---- loglikelihood ---------------------------------------------------------------------------
    def _quiet(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or self.global_rank != 0

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._model(ids).logits

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        scored = []
        for i, (key, context, continuation) in enumerate(requests):
            if not continuation:
                results[i] = (0.0, True)  # nothing to score; the Collator's context grouping assumes tokens
                continue
            if len(continuation) > self.max_length:
                raise EvalError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length={self.max_length}; "
                    "raise max_length or shorten the task's targets."
                )
            scored.append(((i, key), context or [self.prefix_token_id], continuation))

        def sort_key(req):
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        # Requests that share context + continuation[:-1] (multiple choice with one-token answers) run once;
        # `get_cache` hands back each of them with the shared log-probs.
        collator = Collator(scored, sort_fn=sort_key, group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        answers = []
        progress = tqdm(total=len(scored), disable=self._quiet(disable_tqdm), desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            # Score the last len(continuation) positions of (context + continuation)[:-1], left-truncated.
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            batch = torch.full((len(inputs), max(map(len, inputs))), self.eot_token_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)  # right padding: causal, never seen
            logits = self._logits(batch.to(self.device))
            for row, (tag, ctx, cont) in enumerate(chunk):
                end = len(inputs[row])
                logprobs = F.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)[None]
                for (index, key), member_cont, member_logprobs in collator.get_cache(tag, ctx, cont, logprobs):
                    target = torch.tensor(member_cont, dtype=torch.long, device=logprobs.device)
                    picked = member_logprobs[0, -len(member_cont) :]
                    greedy = bool((picked.argmax(dim=-1) == target).all())
                    answer = (float(picked.gather(1, target[:, None]).sum()), greedy)
                    answers.append(answer)
                    results[index] = answer
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    progress.update(1)
        progress.close()
        collator.get_original(answers)  # asserts that every request was answered
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string after the prefix token, every token scored once, in
        disjoint windows of max_length tokens (each window's context is the tokens before it)."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> dict:
        if not isinstance(gen_kwargs, dict):
            raise EvalError(f"generation kwargs must be a dict, not {type(gen_kwargs).__name__}.")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise EvalError(
                f"generation kwarg(s) {', '.join(map(repr, unknown))} are not supported by the ling model; "
                f"use {', '.join(GEN_KWARGS)}."
            )
        until = kwargs["until"]
        if not all(isinstance(s, str) for s in until):
            raise EvalError(f"until={until!r} is not valid; use a string or a list of strings.")
        max_new = _positive_int(kwargs["max_gen_toks"], "max_gen_toks")
        if max_new >= self.max_length:
            raise EvalError(
                f"max_gen_toks={max_new} leaves no room for a prompt within max_length={self.max_length}; "
                f"use fewer than {self.max_length} new tokens or a larger max_length."
            )
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs["do_sample"] else 0.0
        generator = None
        if temperature > 0 and kwargs.get("seed") is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(kwargs["seed"]))
        return {
            "stop_strings": list(until),
            "max_new_tokens": max_new,
            "temperature": temperature,
            "top_k": kwargs.get("top_k"),
            "top_p": kwargs.get("top_p"),
            "generator": generator,  # None: torch's global RNG, which simple_evaluate seeds
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut before the first stop string (EOS also stops it).

        Requests are grouped by generation kwargs and sorted by prompt length; each batch of up to
        batch_size runs in groups of equal prompt length (no padding), one forward per new token."""
        args = [req.args for req in requests]
        encoded: dict[str, list[int]] = {}

        def encode(context: str) -> list[int]:
            if context not in encoded:
                encoded[context] = self.tok_encode(context)
            return encoded[context]

        collator = Collator(
            args, sort_fn=lambda r: (-len(encode(r[0])), r[0]), group_by="gen_kwargs", group_fn=lambda r: r[1]
        )
        texts: list[str] = []
        progress = tqdm(total=len(args), disable=self._quiet(disable_tqdm), desc="Running generate_until requests")
        for chunk in collator.get_batched(n=self.batch_size):
            settings = self._generation_settings(chunk[0][1])
            room = self.max_length - settings["max_new_tokens"]
            prompts = [encode(context)[-room:] or [self.prefix_token_id] for context, _ in chunk]
            start = 0
            while start < len(prompts):
                end = start
                while end < len(prompts) and len(prompts[end]) == len(prompts[start]):
                    end += 1
                prompt = torch.tensor(prompts[start:end], dtype=torch.long, device=self.device)
                # A live model is evaluated in the mode it is in (see the class docstring).
                rows = generate(
                    self._model,
                    prompt,
                    stop_tokens=[self.eot_token_id],
                    decode=self.tok_decode,
                    broadcast=self._broadcast,
                    eval_mode=False,
                    **settings,
                )
                for (context, gen_kwargs), row in zip(chunk[start:end], rows):
                    text = self.tok_decode(row)
                    cut = first_stop(text, settings["stop_strings"])
                    text = text if cut is None else text[:cut]
                    texts.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    progress.update(1)
                start = end
        progress.close()
        return collator.get_original(texts)

    # ---- chat ------------------------------------------------------------------------------------
    def _hf_tokenizer(self):
        """The Hugging Face form of the tokenizer (for its chat template), None if it has none."""
        if self._hf_chat is None:
            ling = isinstance(self.tokenizer, (ByteTokenizer, HFTokenizer))
            self._hf_chat = self.tokenizer.to_hf() if ling else False
        return self._hf_chat or None

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (lm-eval calls this with its --apply_chat_template value)."""
        if chat_template is False or chat_template is None:
            return None
        hf = self._hf_tokenizer()
        template = hf.chat_template if hf is not None else None
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise EvalError(
                    f"chat template {name!r} is not one of the tokenizer's templates ({', '.join(sorted(template))})."
                )
            template = template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the tokenizer's chat template (ending in the assistant prompt when
        add_generation_prompt, else leaving the last message open for lm-eval to continue)."""
        hf = self._hf_tokenizer()
        if hf is None:
            return self.tokenizer.apply_chat_template(chat_history)
        if not hf.chat_template:
            raise EvalError(
                f"tokenizer {self.tokenizer.name!r} has no chat template, so apply_chat_template "
                "cannot be used; evaluate without it or use a tokenizer that defines one."
            )
        return hf.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

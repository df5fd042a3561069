"""The files beside the weights that make a checkpoint folder a complete Hugging Face model folder.

A released Ling folder ships its tokenizer, a `generation_config.json` and the BailingMoeV2 remote code
that `auto_map` in its config.json names. `write_companions` writes the same for an exported folder:
the run's tokenizer, the generation ids, and either a local copy of the remote code (for offline use)
or an `auto_map` that fetches the code from a released Ling repository on the hub, as transformers'
`repo--module.Class` references do. config.json itself is left to the caller, who writes it last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ling.checkpoint.hf import CheckpointError, write_atomic
from ling.data.tokenizer import Tokenizer, save_hf_tokenizer, special_token_ids

HUB_REPO = "inclusionAI/Ling-mini-2.0"
CONFIG_MODULE = "configuration_bailing_moe_v2"
MODELING_MODULE = "modeling_bailing_moe_v2"
# The auto classes and their BailingMoeV2 classes, as the released configs list them.
AUTO_CLASSES = {
    "AutoConfig": f"{CONFIG_MODULE}.BailingMoeV2Config",
    "AutoModel": f"{MODELING_MODULE}.BailingMoeV2Model",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.BailingMoeV2ForCausalLM",
}
GENERATION_CONFIG_NAME = "generation_config.json"
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def auto_map(hub_repo: str | None = HUB_REPO) -> dict[str, str]:
    """`auto_map` entries naming the BailingMoeV2 classes: in `hub_repo` on the hub, or, with None, in
    the code files of the model folder itself."""
    if hub_repo is None:
        return dict(AUTO_CLASSES)
    if not isinstance(hub_repo, str) or hub_repo.count("/") != 1 or "--" in hub_repo or " " in hub_repo:
        raise CheckpointError(
            f"hub_repo={hub_repo!r} is not a hub repository name; use 'owner/name', e.g. {HUB_REPO!r}."
        )
    return {auto: f"{hub_repo}--{ref}" for auto, ref in AUTO_CLASSES.items()}


def write_companions(
    folder: str | os.PathLike,
    config: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    remote_code: str | os.PathLike | None = None,
    hub_repo: str = HUB_REPO,
) -> dict[str, Any]:
    """Write the tokenizer files, generation_config.json and (optionally) the remote code into `folder`,
    and return `config` (a config.json dict, not modified) updated to match them.

    The returned config carries `auto_map` and, when `tokenizer` is given, the tokenizer's
    `bos_token_id` / `eos_token_id` / `pad_token_id` (no `bos_token_id` where it has no BOS). A
    list-valued `eos_token_id` already in `config` is kept when it holds the tokenizer's EOS, since
    released configs list every end-of-turn token there. `remote_code` is a local folder holding
    `configuration_bailing_moe_v2.py` and `modeling_bailing_moe_v2.py`; its `*.py` files are copied and
    `auto_map` names them in the folder itself, so the folder loads offline with
    `trust_remote_code=True`. Without it `auto_map` points at the code in `hub_repo`.

    config.json is not written: the caller writes it last, so a folder with a config.json is complete.
    Every file is written under a temporary name and renamed into place.
    """
    target = Path(folder)
    code_files = _remote_code_files(remote_code) if remote_code is not None else []
    entries = auto_map(None if remote_code is not None else hub_repo)
    updated = dict(config)
    if tokenizer is not None:
        vocab_size = config.get("vocab_size")
        if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
            raise CheckpointError(
                f"the tokenizer emits {tokenizer.vocab_size} ids but the model's vocab_size is {vocab_size}; "
                "export with the tokenizer the model was trained with."
            )
        updated.update(_tokenizer_ids(tokenizer, config.get("eos_token_id")))
        if updated["bos_token_id"] is None:
            del updated["bos_token_id"]
    target.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, target)
    for file in code_files:
        write_atomic(target / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
    generation = {key: updated[key] for key in _ID_KEYS if updated.get(key) is not None}
    text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
    write_atomic(target / GENERATION_CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    existing = config.get("auto_map")
    updated["auto_map"] = {**(existing if isinstance(existing, dict) else {}), **entries}
    return updated


def _tokenizer_ids(tokenizer: Tokenizer, config_eos: Any) -> dict[str, Any]:
    ids: dict[str, Any] = special_token_ids(tokenizer)
    eos = ids["eos_token_id"]
    if (
        isinstance(config_eos, list)
        and eos in config_eos
        and all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in config_eos)
    ):
        ids["eos_token_id"] = list(config_eos)
    return ids


def _remote_code_files(remote_code: str | os.PathLike) -> list[Path]:
    source = Path(remote_code).expanduser()
    required = [f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py"]
    if not source.is_dir() or any(not (source / name).is_file() for name in required):
        raise CheckpointError(
            f"remote_code={os.fspath(remote_code)!r} is not a folder holding {required[0]} and {required[1]}; "
            "pass a local copy of the BailingMoeV2 code files (as in a released Ling model folder)."
        )
    return sorted(p for p in source.glob("*.py") if p.is_file())

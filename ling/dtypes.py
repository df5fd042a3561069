"""The dtype names a user writes (YAML, command-line flags, config.json's `torch_dtype`): torch's own.

One table, so that `bfloat16` means the same everywhere and every refusal lists the same names.
`float8_e4m3fn` is accepted only where float8 is meant (the 128x128 block-scaled Hugging Face export).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ling.config import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT8 = "float8_e4m3fn"
FLOAT8_DTYPES: dict[str, torch.dtype] = {**DTYPES, FLOAT8: torch.float8_e4m3fn}


def dtype_named(
    name: str | None, setting: str, table: Mapping[str, torch.dtype | None] = DTYPES, *, optional: bool = True
) -> torch.dtype | None:
    """The torch dtype called `name` in `table`; a ConfigError naming `setting` and the valid names otherwise.

    None stays None (the setting's default, e.g. "keep each tensor's dtype") unless `optional` is False.
    """
    if name is None and optional:
        return None
    if not isinstance(name, str) or name not in table:
        valid = ", ".join(table) + (" (or null)" if optional else "")
        raise ConfigError(f"{setting}={name!r} is not a dtype name; use one of {valid}.")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype in this vocabulary (`torch.bfloat16` -> `bfloat16`)."""
    return str(dtype).removeprefix("torch.")

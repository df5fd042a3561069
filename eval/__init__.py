"""lm-evaluation-harness integration for Ling models, used from the checkout (never installed).

Importing `eval` registers `LingLM` under the lm-eval model names `ling` and `bailing_moe_v2`.
"""

from eval.lm import EvalError, LingLM

__all__ = ["EvalError", "LingLM"]

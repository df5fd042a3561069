from ling.model.cache import KVCache
from ling.model.model import IGNORE_INDEX, LingForCausalLM, LingOutput, build_model

__all__ = ["IGNORE_INDEX", "KVCache", "LingForCausalLM", "LingOutput", "build_model"]

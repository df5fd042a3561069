"""ling-train: the Ling 2.0 mixture-of-experts models and their training machinery."""

from ling.config import ConfigError, LingConfig
from ling.presets import preset

__all__ = ["ConfigError", "LingConfig", "preset"]

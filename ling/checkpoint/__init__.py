from ling.checkpoint.export import export_hf, save_pretrained
from ling.checkpoint.hf import CheckpointError
from ling.checkpoint.load import load_hf_weights, load_pretrained

__all__ = ["CheckpointError", "export_hf", "load_hf_weights", "load_pretrained", "save_pretrained"]

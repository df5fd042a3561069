from ling.checkpoint.hf import CheckpointError, hf_state_dict, load_pretrained, save_pretrained

__all__ = ["CheckpointError", "hf_state_dict", "load_pretrained", "save_pretrained"]

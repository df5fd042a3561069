"""Text to training batches: tokenizers, corpora and the Lightning data module."""

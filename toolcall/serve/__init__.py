"""Serving the tuned model (mlx_lm.server) and checking its GGUF against transformers."""

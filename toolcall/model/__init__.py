"""The model: fetching and converting it, GGUF both ways, LoRA, export, native kernels, BLAS."""

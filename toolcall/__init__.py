"""Fine-tune small language models for tool calling and measure what helps.

Importing the package first makes MLX use a fast BLAS on Linux (see ``blas``):
it must happen before ``mlx.core`` is imported anywhere in the process.
"""

from toolcall.model import blas

blas.load_openblas()

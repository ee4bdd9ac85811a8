"""Numba kernels: everything that touches numbers in the hot path.

This package knows nothing of models, files or tokenizers. It offers
- `formats`: the table of weight storage formats, each with the kernels that read it;
- `ops`: RMSNorm, rotary embeddings, SwiGLU;
- `attention`: KV-cache writes and causal grouped-query attention.

Importing it sets NUMBA_SLP_VECTORIZE=1 unless the user chose otherwise: LLVM's SLP
vectorizer is what turns the block-wise integer dot products of the quantized
kernels into SIMD code, and numba only reads the variable when it is first imported.
"""
import os

os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")

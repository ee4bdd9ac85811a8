"""Numba kernels: everything that touches numbers in the hot path.

This package knows nothing of models, files or tokenizers. It offers
- `formats`: the table of weight storage formats, each with the kernels that read it;
- `quant`: the Q8_0 / Q4_0 block formats and their integer kernels;
- `ops`: RMSNorm, rotary embeddings, SwiGLU;
- `attention`: the KV cache and causal grouped-query attention.

Importing it turns on LLVM's SLP vectorizer (numba's NUMBA_SLP_VECTORIZE, off by default),
unless the user set that variable: it is what turns the block-wise integer dot products and
the int4 unpacking into SIMD code. numba reads the setting at every compilation, so it is set
on numba's config object directly and works whatever was imported first. All kernels must be
compiled with it (cache=True would otherwise keep a slow copy), hence here, not per kernel.
"""
import os

if "NUMBA_SLP_VECTORIZE" not in os.environ:
    os.environ["NUMBA_SLP_VECTORIZE"] = "1"
    from numba.core import config as _numba_config
    _numba_config.SLP_VECTORIZE = 1

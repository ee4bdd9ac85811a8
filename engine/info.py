"""`python -m engine info`: what a model is, read from its files without loading the weights."""
from collections import Counter

import numpy as np

from .config import load_config
from .gguf import GGUFFile, gguf_config
from .resolve import resolve
from .tokenizer import Tokenizer, tokenizer_from_gguf
from .weights import check_layer_count, read_checkpoint, stored_formats


def model_info(name: str) -> list[tuple[str, str]]:
    resolved = resolve(name)
    path = resolved.path
    if path.is_file():
        g = GGUFFile(path)
        config = gguf_config(g)
        counts = Counter(t.type_name for t in g.tensors.values())
        params = sum(int(np.prod(t.shape)) for t in g.tensors.values())
        size = path.stat().st_size
        tokenizer = tokenizer_from_gguf(g.metadata)
        tokenizer_kind = f"GGUF {g.metadata.get('tokenizer.ggml.model')} (pre-tokenizer " \
                         f"{g.metadata.get('tokenizer.ggml.pre', 'default')})"
        file_kind = f"GGUF v{g.version}"
    else:
        config = load_config(path)
        tensors, metadata = read_checkpoint(path)
        check_layer_count(config, tensors)
        formats = stored_formats(metadata)
        counts = Counter(formats.get(n, dtype) for n, (dtype, _) in tensors.items())
        params = sum(int(np.prod(a.shape)) if n not in formats else 0 for n, (_, a) in tensors.items())
        params += sum(_elements(n, config) for n in formats)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        tokenizer = Tokenizer.from_dir(path)
        tokenizer_kind = "tokenizer.json"
        file_kind = "quantized safetensors" if formats else "safetensors"
    template = (tokenizer.chat_template_source or "(none)").replace("\n", "\\n")
    c = config
    return [
        ("source", resolved.source),
        ("format", file_kind),
        ("architecture", c.architecture),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in counts.most_common())),
        ("file size", f"{size / 1e6:.1f} MB"),
        ("context length", str(c.max_position_embeddings)),
        ("shape", f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV), "
                  f"head_dim {c.head_dim}, intermediate {c.intermediate_size}"),
        ("rope", f"theta {c.rope_theta:g}" + (", llama3 scaling" if c.rope_scaling or c.rope_freq_factors else "")),
        ("tokenizer", f"{tokenizer_kind}, {tokenizer.vocab_size} tokens, BOS "
                      f"{tokenizer.special_tokens.get('bos_token')!r}, EOS {tokenizer.special_tokens.get('eos_token')!r}"),
        ("chat template", template[:160] + ("..." if len(template) > 160 else "")),
    ]


def _elements(name: str, config) -> int:
    from .weights import expected_shapes
    shape = expected_shapes(config).get(name, (0,))
    return int(np.prod(shape))

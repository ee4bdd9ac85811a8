"""`python -m engine info`: what a model is, read from its files without loading the weights."""
from .resolve import resolve
from .source import capabilities, open_source


def model_info(name: str) -> list[tuple[str, str]]:
    resolved = resolve(name)
    source = open_source(resolved.path)
    c, details, tokenizer = source.config, source.details(), source.tokenizer
    template = (tokenizer.chat_template_source or "(none)").replace("\n", "\\n")
    params = details.parameters
    return [
        ("source", resolved.source),
        ("format", details.file_format),
        ("architecture", c.architecture),
        ("parameters", f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"),
        ("quantization", details.quantization),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in details.tensor_types.most_common())),
        ("file size", f"{details.file_size / 1e6:.1f} MB"),
        ("context length", str(c.max_position_embeddings)),
        ("shape", f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV), "
                  f"head_dim {c.head_dim}, intermediate {c.intermediate_size}"),
        ("rope", f"theta {c.rope_theta:g}" + (", llama3 scaling" if c.rope_scaling or c.rope_freq_factors else "")),
        ("tokenizer", f"{details.tokenizer}, {tokenizer.vocab_size} tokens, BOS "
                      f"{tokenizer.special_tokens.get('bos_token')!r}, EOS {tokenizer.special_tokens.get('eos_token')!r}"),
        ("capabilities", ", ".join(capabilities(tokenizer))),
        ("chat template", template[:160] + ("..." if len(template) > 160 else "")),
    ]

"""Tiny random-weight Qwen2 and Llama checkpoints in Hugging Face format, built for the tests.

Each is saved by transformers itself (safetensors + config.json) with a small byte-level BPE
tokenizer trained on the spot, DeepSeek's special tokens and chat template, so the engine sees
the same files as a real DeepSeek-R1-Distill repo, only smaller. Weights are N(0, 1/fan_in)
(q and k larger), so attention is far from uniform and logits have clear winners.
"""
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [EOS, "<｜User｜>", "<｜Assistant｜>", BOS]
ADDED_TOKENS = ["<think>", "</think>"]   # added but not special, as in DeepSeek's tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1905 Einstein published four papers; 3.14159 and 2.71828 are constants.",
    "Hello world! How are you today? I am fine, thank you very much.",
    "Once upon a time there was a little model that wanted to think before it answered.",
]


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(ADDED_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (DATA / "deepseek_chat_template.jinja").read_text(encoding="utf-8"),
    }, ensure_ascii=False, indent=1), encoding="utf-8")


def randomize(model, seed: int) -> None:
    """N(0, 1/fan_in) weights, q/k twice that scale, norms near 1, biases small.

    An untied LM head is a shuffled copy of the embedding plus noise, a made-up bigram table:
    like a trained model, the next-token distribution is peaked rather than flat (so that top-1
    agreement measures the numerics, not near-ties of random logits), and greedy text does not
    just repeat the last token."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                shuffled = model.get_input_embeddings().weight[torch.randperm(p.shape[0], generator=g)]
                p.copy_(0.15 * (shuffled + 0.5 * torch.randn(p.shape, generator=g)))
            else:
                scale = (2.0 if ("q_proj" in name or "k_proj" in name) else 1.0) / p.shape[1] ** 0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))


def make_model(out: Path, arch: str, dtype: str = "float32", legacy_config: bool = False, seed: int = 0) -> Path:
    """Save a tiny model of `arch` ("qwen2" or "llama") in `dtype` to `out`; return `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    save_tokenizer(tok, out)
    common = dict(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
                  rms_norm_eps=1e-6)
    if arch == "qwen2":
        # DeepSeek-R1-Distill-Qwen: q/k/v biases, untied embeddings, plain rope
        config = Qwen2Config(hidden_size=128, intermediate_size=160, max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             tie_word_embeddings=False, **common)
        model = Qwen2ForCausalLM(config)
    else:
        # DeepSeek-R1-Distill-Llama: llama3 rope scaling; here with a small original context
        # (prompts longer than it are tested), tied embeddings and head_dim != hidden/heads
        config = LlamaConfig(hidden_size=64, intermediate_size=160, head_dim=32, max_position_embeddings=512,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32},
                             tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(config)
    randomize(model, seed)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    if legacy_config:
        to_legacy_config(out / "config.json")
    return out


def to_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the legacy layout of the DeepSeek repos."""
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = None if params.get("rope_type") == "default" else params
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    path.write_text(json.dumps(raw, indent=2))


def reference_logits(model_dir: Path, ids) -> np.ndarray:
    """transformers' float32 logits for ids (bf16 weights upcast), shape (len(ids), vocab)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def reference_greedy(model_dir: Path, ids, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows of Llama models for its interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len) -> np.ndarray:
    """The rope_freqs tensor as llama.cpp's converter writes it for Llama 3 scaling."""
    import math
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def hf_to_gguf(model_dir: Path, out: Path, version: int = 3, matrix_type=None) -> Path:
    """Write a tiny float32 HF checkpoint as a GGUF file the way llama.cpp's converter lays it out;
    with matrix_type (a GGMLQuantizationType the gguf package quantizes), every 2-D weight but
    the embedding in that type."""
    from gguf import GGUFWriter, quants
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}), "rope_theta": config["rope_theta"]}

    w = GGUFWriter(str(out), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(rope["rope_theta"])
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.get)
    special = {a["content"]: a["special"] for a in tokenizer["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([(3 if special[t] else 4) if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    w.add_bos_token_id(vocab[BOS])
    w.add_eos_token_id(vocab[EOS])
    w.add_add_bos_token(True)
    w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for name, value in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            kind = ".".join(rest[:-1])
            gguf_name = f"blk.{i}.{layer_names[kind]}.{rest[-1]}"
            if arch == "llama" and kind in ("self_attn.q_proj", "self_attn.k_proj"):
                value = llama_cpp_permute(value, heads if kind == "self_attn.q_proj" else kv_heads)
        else:
            gguf_name = names[name]
        value = np.ascontiguousarray(value, dtype=np.float32)
        if matrix_type is not None and value.ndim == 2 and gguf_name != "token_embd.weight":
            w.add_tensor(gguf_name, quants.quantize(value, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(gguf_name, value)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(
            rope["rope_theta"], head_dim, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:   # GGUF v2 differs from v3 only in the version field (v3 added big-endian files)
        data = bytearray(out.read_bytes())
        data[4:8] = version.to_bytes(4, "little")
        out.write_bytes(bytes(data))
    return out

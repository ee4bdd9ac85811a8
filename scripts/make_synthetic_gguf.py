"""Write random-weight GGUF files with the exact shapes of DeepSeek-R1-Distill-Qwen-1.5B (or 7B).

Speed does not depend on the weights' values, only on shapes and types, so the tensors are
arbitrary bytes with small valid fp16 scales; the tokenizer and chat template are DeepSeek's
(from ../shared's header-only GGUF), so both engines load the file like a real one.

    python scripts/make_synthetic_gguf.py --type q4_0 --out /tmp/r1-1.5b-q4_0.gguf [--shape 1.5b]

Types: q4_0, q8_0, and q4_k_m (Q4_K everywhere, Q6_K for the output and for attn_v and ffn_down
in every other layer, as llama.cpp's Q4_K_M mix does).
"""
import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from engine.kernels.formats import FORMATS

SHAPES = {
    "1.5b": dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, layers=28, vocab=151936, theta=10000.0),
    "7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, layers=28, vocab=152064, theta=10000.0),
}
HEADER = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepseek-r1-distill-qwen-7b.header-only.gguf"


def random_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    fmt = next(f for f in FORMATS.values() if f.ggml_type == int(qtype))   # its geometry and scale fields
    data = rng.integers(0, 256, (rows, fmt.row_bytes(cols)), dtype=np.uint8)
    blocks = data.reshape(-1, fmt.block_bytes)
    for offset in fmt.f16_fields:   # fp16 0.0039 (0x1C00): small and valid
        blocks[:, offset], blocks[:, offset + 1] = 0x00, 0x1C
    return data


def write(out: Path, shape: str, kind: str, seed: int = 0) -> Path:
    from engine.gguf import GGUFFile
    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    meta = GGUFFile(HEADER, require_data=False).metadata
    w = GGUFWriter(str(out), "qwen2")
    w.add_name(f"synthetic DeepSeek-R1-Distill-Qwen-{shape} {kind}")
    w.add_block_count(s["layers"])
    w.add_context_length(131072)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"][:s["vocab"]])
    w.add_token_types(meta["tokenizer.ggml.token_type"][:s["vocab"]].tolist())
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(meta["tokenizer.chat_template"])

    base = {"q4_0": T.Q4_0, "q8_0": T.Q8_0, "q4_k_m": T.Q4_K}[kind]
    d, kv = s["hidden"], s["kv_heads"] * s["hidden"] // s["heads"]

    def matrix(name, rows, cols, qtype=base):
        w.add_tensor(name, random_blocks(rows, cols, qtype, rng), raw_dtype=qtype)

    def vector(name, n, value=1.0):
        w.add_tensor(name, np.full(n, value, np.float32))

    matrix("token_embd.weight", s["vocab"], d)
    vector("output_norm.weight", d)
    matrix("output.weight", s["vocab"], d, T.Q6_K if kind == "q4_k_m" else base)
    for i in range(s["layers"]):
        more_bits = kind == "q4_k_m" and i % 2 == 0
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", d)
        vector(p + "ffn_norm.weight", d)
        matrix(p + "attn_q.weight", d, d)
        matrix(p + "attn_k.weight", kv, d)
        matrix(p + "attn_v.weight", kv, d, T.Q6_K if more_bits else base)
        matrix(p + "attn_output.weight", d, d)
        vector(p + "attn_q.bias", d, 0.0)
        vector(p + "attn_k.bias", kv, 0.0)
        vector(p + "attn_v.bias", kv, 0.0)
        matrix(p + "ffn_gate.weight", s["intermediate"], d)
        matrix(p + "ffn_up.weight", s["intermediate"], d)
        matrix(p + "ffn_down.weight", d, s["intermediate"], T.Q6_K if more_bits else base)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", required=True, choices=["q4_0", "q8_0", "q4_k_m"])
    parser.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write(Path(args.out), args.shape, args.type))


if __name__ == "__main__":
    main()

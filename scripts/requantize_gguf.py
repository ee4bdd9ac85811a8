"""Re-quantize a GGUF file with llama.cpp's own quantizer (SmolLM2 in every file type people use).

SmolLM2-135M ships as Q4_1 only; llama.cpp converts it, as `llama-quantize --allow-requantize`
would, into the file types of TYPES: the same mixes of tensor types (fallbacks included) that
files downloaded from Hugging Face hold. Re-quantizing from 4 bits loses quality: these files
are for speed and for comparing our perplexity with llama.cpp's on the same file
(scripts/perplexity.py), not for use.

    python scripts/requantize_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf --type q4_0 --out /tmp/smollm2-q4_0.gguf
"""
import argparse
import sys

TYPES = ["q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--type", required=True, choices=TYPES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import llama_cpp   # pip install --find-links ../shared/wheels llama-cpp-python==0.3.36
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type.upper()}")
    params.allow_requantize = True
    params.nthread = args.threads
    status = llama_cpp.llama_model_quantize(args.source.encode(), args.out.encode(), params)
    if status != 0:
        sys.exit(f"llama.cpp could not quantize {args.source} (status {status})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Re-quantize a GGUF file with llama.cpp's own quantizer (for the benchmark's SmolLM2 Q4_0/Q8_0).

SmolLM2-135M ships as Q4_1 only; llama.cpp converts it, as `llama-quantize --allow-requantize`
would. Re-quantizing from 4 bits loses quality: these files are for speed measurements.

    python scripts/requantize_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf --type q4_0 --out /tmp/smollm2-q4_0.gguf
"""
import argparse
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("--type", required=True, choices=["q4_0", "q8_0", "q4_k_m"])
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

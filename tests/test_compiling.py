"""A machine's first run: the kernels a model needs are listed before its weights are read (a
stand-in model of the same formats, kernels.compiler.recorded_calls) and compiled in two
processes (kernels.compiler.CompileAhead); a helper that fails costs only time; a second run
compiles nothing. The runs that must start with an empty numba cache are subprocesses."""
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import tiny_models
from engine.kernels.compiler import available_cores


def python(code: str, cache, timeout=600):
    """Run code in a new process whose numba cache is `cache` (empty: a first run)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quantized_gguf(model_dirs, tmp_path_factory):
    """The tiny Llama with its matrices in Q4_0 (llama's interleaved rope, a GGUF tokenizer; a
    format with a kernel for tiles of tokens)."""
    from gguf import GGMLQuantizationType
    return tiny_models.hf_to_gguf(model_dirs("llama-f32"), tmp_path_factory.mktemp("gguf") / "q4_0.gguf",
                                  matrix_type=GGMLQuantizationType.Q4_0)


def test_the_stand_in_lists_every_kernel_the_model_calls(model_dirs, quantized_gguf, smollm2, tmp_path):
    """For float and block formats, both architectures and every KV cache kind: what the real
    model's forward pass compiles is exactly what the stand-in listed before the weights were read
    (the stand-in may list more only where loading the weights compiled it already)."""
    models = [(str(model_dirs("qwen2-f32")), "f16"), (str(model_dirs("llama-bf16")), "q8_0"),
              (str(quantized_gguf), "f32"), (str(smollm2), "f16")]
    code = f"""
from engine.model import Transformer, stand_in_calls
from engine.source import open_source
from engine.weights import load_weights
for path, kv in {models!r}:
    source = open_source(path)
    tensors, formats = source.tensors()
    listed = stand_in_calls(source.config, tensors, formats, kv)
    weights = load_weights(source.config, tensors, formats, source.weight_cache())
    called = Transformer(source.config, weights, 64, kv_cache=kv).kernel_calls()
    assert called and set(called) <= set(listed), (path, set(called) - set(listed))
    assert all(signature in kernel.overloads for kernel, signature in set(listed) - set(called)), path
    print(path, kv, sorted(kernel.py_func.__name__ for kernel, _ in called))
"""
    result = python(code, tmp_path / "numba")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'matmul_f32'" in lines[0] and "'attention_f16'" in lines[0]
    assert "'matmul_bf16'" in lines[1] and "'attention_q8_0'" in lines[1]
    assert "'matmul_q4_0'" in lines[2] and "'matmul_q4_0_tiles'" in lines[2] and "'attention_f32'" in lines[2]
    assert "'matmul_q4_1'" in lines[3] and "'matmul_q8_0'" in lines[3]   # SmolLM2: Q4_1 layers, Q8_0 head


def test_a_first_run_compiles_in_two_processes_and_the_next_compiles_nothing(model_dirs, tmp_path):
    """(With two cores or more; on one, in this process alone.)"""
    model = str(model_dirs("qwen2-f32"))
    run = [sys.executable, "-m", "engine", "generate", "--model", model, "--prompt", "Hi", "-n", "2", "--verbose"]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    first = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compiling kernels for this CPU") == 1
    if available_cores() > 1:
        summary = re.search(r"^compiled (\d+) kernels in [\d.]+s \((\d+) of them in a second process\)$",
                            first.stderr, re.M)
        assert summary, first.stderr
        assert 0 < int(summary[2]) < int(summary[1])
    else:   # one core: no helper
        assert re.search(r"^compiled \d+ kernels in [\d.]+s$", first.stderr, re.M), first.stderr
    second = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr
    assert "compiling kernels" not in second.stderr
    assert "compile duration:     0.000s" in second.stderr


@pytest.mark.parametrize("helper", ["exits at once", "cannot start"])
def test_a_helper_that_fails_costs_only_time(helper, model_dirs, tmp_path):
    """The helper process exits at once, or cannot be started: this process compiles every
    kernel itself, and answers."""
    command = ["sys.executable", "'-c'", "'import sys; sys.exit(3)'"] if helper == "exits at once" \
        else ["'/nonexistent/python'"]
    code = f"""
import sys
import engine
from engine.kernels import compiler
compiler._Helper.command = [{", ".join(command)}]
llm = engine.load({str(model_dirs("llama-f32"))!r})
print(len(llm.generate("Hi", max_tokens=3, temperature=0)) > 0, compiler.COMPILE_LOG.by_helper,
      len(compiler.COMPILE_LOG.compiled))
"""
    result = python(code, tmp_path / "numba")
    assert result.returncode == 0, result.stderr
    answered, by_helper, compiled = result.stdout.split()
    assert answered == "True" and by_helper == "0" and int(compiled) >= 5


def test_recording_leaves_other_threads_alone():
    """While one thread lists a model's kernels (they do nothing), another thread's call of a
    kernel that is not compiled yet compiles and computes as usual."""
    from engine.kernels.compiler import recorded_calls
    from engine.kernels.ops import rmsnorm
    x = np.arange(1.0, 9.0).reshape(1, 8)   # float64: a signature nothing else compiles
    out = np.zeros_like(x)
    with recorded_calls() as calls:
        worker = threading.Thread(target=rmsnorm, args=(x, np.ones(8), 1e-6, out))
        worker.start()
        worker.join()
    assert not calls
    np.testing.assert_allclose(out, x / np.sqrt((x * x).mean() + 1e-6), rtol=1e-6)


def test_recorded_argument_types_are_numbas():
    """The recorder types arrays by numba's fingerprint (and alignment), once per key: each
    argument's recorded type is the one numba's dispatcher gives that value, for every kind of
    array that differs in type only (layout, writability, alignment, dtype, dimensions)."""
    from numba import njit
    from engine.kernels.compiler import recorded_calls

    @njit(cache=False)
    def kernel(a, b, c):   # defined here: a kernel that has never compiled anything
        return 0
    base = np.zeros((8, 8), np.float32)
    read_only = base.copy()
    read_only.setflags(write=False)
    unaligned = np.zeros(65, np.uint8)[1:].view(np.float32)   # one byte off
    values = [base, base.T, base[:, ::2], read_only, unaligned, base.astype(np.float16), base[0], base[:, :, None],
              3, 2.5, np.int32(4), True]
    import engine.kernels.compiler as compiler
    kernels = compiler._kernels
    compiler._kernels = lambda: [kernel]
    try:
        with recorded_calls() as calls:
            for a in values:
                for b in values[:3]:
                    kernel(a, b, base)
    finally:
        compiler._kernels = kernels
    recorded = [signature for _, signature in calls]
    expected = list(dict.fromkeys(tuple(kernel.typeof_pyval(x) for x in (a, b, base))
                                  for a in values for b in values[:3]))
    assert recorded == expected
    assert not unaligned.flags.aligned and len(recorded) >= 3 * (len(values) - 1)

"""`python -m engine <command>`: see engine/cli.py.

When the command is done the process ends without tearing the interpreter down: freeing
numba's compiled code, the tokenizer's tables and the weights' mappings one object at a time
took 0.4-0.6 s after the last token (1.5B GGUF), for memory the operating system reclaims at
once anyway. Exit handlers still run, output is flushed, and a weight-cache entry still being
written (engine/weight_cache.py) is finished first.
"""
import atexit
import os
import sys
import threading

from .cli import main

code = main()
for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
        thread.join()
atexit._run_exitfuncs()   # what a normal exit runs first (logging's flush, tqdm's monitor)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)

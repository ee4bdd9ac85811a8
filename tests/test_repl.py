"""`python -m engine run`: the interactive session driven through a pseudo-terminal on SmolLM2
(a question, /set parameter, Ctrl-C in the middle of an answer, /bye), and the one-shot forms."""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from engine.surfaces.repl import Session, parse_value


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """A child process on a pseudo-terminal, read until patterns appear (terminal control
    sequences removed)."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:   # the child: Ctrl-C must reach it even if the tests run with SIGINT ignored
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(sys.executable, [sys.executable, *args], env)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        """Output up to and including the first match of `pattern` after what was already matched."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.seen)
            if match:
                before, self.seen = self.seen[:match.end()], self.seen[match.end():]
                return before
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen = ANSI.sub("", self.seen + os.read(self.fd, 4096).decode("utf-8", "replace"))
                except OSError:   # the child closed the terminal
                    assert re.search(pattern, self.seen), f"no {pattern!r} in {self.seen[-2000:]!r}"

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if ready:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError(f"the session did not end: {self.seen[-2000:]!r}")


PROMPT = ">>>"


def test_an_interactive_session(smollm2, tmp_path):
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path)}
    term = Terminal(["-m", "engine", "run", str(smollm2)], env)
    term.read_until(PROMPT)

    def command(text, expect):
        term.send(text + "\r")
        term.read_until(expect)
        term.read_until(PROMPT)
    command("/set parameter temperature 0", "Set parameter 'temperature' to '0'")
    command("/set parameter repeat_penalty 1", "Set parameter 'repeat_penalty' to '1'")
    command("/set system You are a helpful assistant.", "Set system message.")
    command("What is the capital of France?", "Paris")
    command("/set parameter num_predict 2000", "Set parameter 'num_predict'")
    term.send("Write a very long story about a dragon, in many chapters.\r")
    term.read_until(r"chapters\.\n")                        # the line is entered
    term.read_until(r"\w+ \w+ \w+ \w+ \w+ \w+ \w+ \w+")   # the answer is streaming
    term.send("\x03")                                       # Ctrl-C: the answer stops, the session stays
    assert len(term.read_until(PROMPT, timeout=60)) < 3000   # stopped, not 2000 tokens later
    term.send('"""Say the word\r')                         # several lines between triple quotes
    term.read_until(r"\.\.\.")
    term.send('hello"""\r')
    term.read_until(PROMPT)
    command("/show parameters", "temperature")
    command("/nonsense", "Unknown command")
    term.send("/bye\r")
    assert term.wait() == 0
    assert "Traceback" not in term.seen and "error:" not in term.seen
    assert (tmp_path / "engine" / "history").read_text().count("What is the capital of France?") == 1


def test_one_shot_with_a_prompt_and_with_stdin(smollm2):
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(smollm2), "What is the capital of France?"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0 and done.stdout.strip()
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(smollm2), "--verbose"],
                          input="Name a color.", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() and "eval rate:" in done.stderr


def test_set_parameter_checks_its_name():
    session = Session("unused")
    with pytest.raises(Exception, match="unknown option 'temprature'"):
        session.command("/set parameter temprature 0.5")
    session.command("/set parameter stop END")
    session.command("/set parameter stop FIN")
    assert session.options["stop"] == ["END", "FIN"]
    assert (parse_value("3"), parse_value("0.5"), parse_value("x")) == (3, 0.5, "x")

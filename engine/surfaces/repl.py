"""`python -m engine run MODEL [PROMPT]`: a chat like `ollama run`.

With a prompt (or text piped on stdin) it answers once and exits. Otherwise it is an
interactive session: line editing and a history file (prompt_toolkit), multi-line input between
triple quotes, answers streamed as they come, reasoning shown dimmed between "Thinking..." and
"...done thinking." (or hidden). Ctrl-C stops the answer in progress and keeps the session;
Ctrl-D or /bye leaves. Commands, as Ollama's: /set parameter NAME VALUE, /set system TEXT,
/set think, /set nothink, /set verbose, /set quiet, /show info, /show parameters, /show
template, /clear, /? (help).
"""
import json
import os
import sys
from pathlib import Path

from . import api
from ..errors import EngineError

DIM, RESET = "\033[2m", "\033[0m"
HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling or generation option (Ollama's names: temperature,
                              top_k, top_p, min_p, seed, num_predict, repeat_penalty, stop, ...)
  /set system TEXT            set the system message
  /set think, /set nothink    let the model reason first, or answer at once
  /set verbose, /set quiet    show or hide the statistics after each answer
  /show info | parameters | template
  /clear                      forget the conversation
  /bye                        leave (or Ctrl-D)
  /?                          this help
Use \"\"\" to begin and end a message of several lines. Ctrl-C stops an answer."""


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "engine" / "history"


def parse_value(text: str):
    """A parameter's value from the command line: an integer, a number, or text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Session:
    """One conversation with one model: its messages and settings."""

    def __init__(self, model: str, *, think=None, hide_thinking: bool = False, verbose: bool = False,
                 options: dict | None = None, system: str | None = None, out=None, before_output=None):
        self.model = model
        self.think = think
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self.options = dict(options or {})
        self.system = system
        self.messages = []
        self.out = out or sys.stdout
        self.styled = self.out.isatty()
        self.before_output = before_output   # called before an answer's first output (ends a progress line)

    def load(self) -> None:
        """Load the model now (a chat without messages would only load it in Ollama)."""
        api.MODELS.keep(self.model, api.split_options(self.options)["load"])

    def ask(self, text: str) -> None:
        """Stream the answer to `text`; on Ctrl-C stop it and forget this turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        self.messages.append({"role": "user", "content": text})
        stream = api.chat(self.model, system + self.messages, stream=True, think=self.think,
                          options=self.options, keep_alive=-1)
        answer, thinking_shown, last = [], False, None
        try:
            for chunk in stream:
                last = chunk
                thinking = chunk["message"]["thinking"]
                if thinking and not self.hide_thinking:
                    if not thinking_shown:
                        self._write(self._dim("Thinking...\n"))
                        thinking_shown = True
                    self._write(self._dim(thinking))
                content = chunk["message"]["content"]
                if content:
                    if thinking_shown:
                        self._write(self._dim("\n...done thinking.\n\n"))
                        thinking_shown = False
                    self._write(content)
                    answer.append(content)
        except KeyboardInterrupt:
            stream.close()
            self.messages.pop()
            self._write("\n")
            return
        self._write("\n\n")
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        if self.verbose and last is not None:
            self._write(statistics(last), to=sys.stderr)

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        words = line.split()
        head = words[0]
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            self._write(HELP + "\n")
        elif head == "/clear":
            self.messages = []
            self._write("Cleared session context\n")
        elif head == "/set" and len(words) >= 2:
            self._set(words[1], line.split(None, 2)[2] if len(words) > 2 else "")
        elif head == "/show" and len(words) == 2:
            self._show(words[1])
        else:
            self._write(f"Unknown command '{line.strip()}'. Type /? for help\n")
        return True

    def _set(self, what: str, rest: str) -> None:
        if what == "parameter":
            name, _, value = rest.partition(" ")
            if not value.strip():
                raise EngineError("usage: /set parameter NAME VALUE")
            value = parse_value(value.strip())
            if name == "stop":
                value = [*self.options.get("stop", []), str(value)]
            api.split_options({**self.options, name: value})   # an unknown name or bad value says so now
            self.options[name] = value
            self._write(f"Set parameter '{name}' to '{value}'\n")
        elif what == "system":
            self.system = rest.strip().strip('"') or None
            self._write("Set system message.\n")
        elif what in ("think", "nothink"):
            self.think = what == "think"
            self._write(f"Set '{what}' mode.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            self._write(f"Set '{what}' mode.\n")
        else:
            raise EngineError(f"unknown setting {what!r}; see /?")

    def _show(self, what: str) -> None:
        from ..info import model_info
        if what == "info":
            self._write("".join(f"  {label:<16}{value}\n" for label, value in model_info(self.model)))
        elif what == "parameters":
            shown = {**self.options, **({"system": self.system} if self.system else {})}
            self._write(("".join(f"  {k:<20}{json.dumps(v)}\n" for k, v in shown.items()))
                        or "No parameters set; the model's defaults apply (python -m engine generate --verbose "
                           "lists them).\n")
        elif what == "template":
            llm = api.MODELS.keep(self.model, api.split_options(self.options)["load"])
            self._write((llm.tokenizer.chat_template_source or "(no chat template)") + "\n")
        else:
            raise EngineError(f"unknown /show {what!r}; see /?")

    def _dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.styled else text

    def _write(self, text: str, to=None) -> None:
        if self.before_output is not None:
            self.before_output()
        stream = to or self.out
        stream.write(text)
        stream.flush()


def statistics(response) -> str:
    """Ollama's --verbose statistics from a final response (durations in nanoseconds)."""
    def seconds(ns):
        return f"{ns / 1e9:.3f}s"

    def rate(count, ns):
        return f"{count / (ns / 1e9):.2f} tokens/s" if ns else "n/a"
    r = response
    return (f"total duration:       {seconds(r['total_duration'])}\n"
            f"load duration:        {seconds(r['load_duration'])}\n"
            f"prompt eval count:    {r['prompt_eval_count']} token(s)\n"
            f"prompt eval duration: {seconds(r['prompt_eval_duration'])}\n"
            f"prompt eval rate:     {rate(r['prompt_eval_count'], r['prompt_eval_duration'])}\n"
            f"eval count:           {r['eval_count']} token(s)\n"
            f"eval duration:        {seconds(r['eval_duration'])}\n"
            f"eval rate:            {rate(r['eval_count'], r['eval_duration'])}\n")


def read_message(prompt_session) -> str | None:
    """One message: a line, or lines between triple quotes. None at Ctrl-D."""
    try:
        line = prompt_session.prompt(">>> ")
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):   # opened and closed on one line
        return first.rstrip()[:-3]
    lines = [first]
    while True:
        try:
            more = prompt_session.prompt("... ")
        except EOFError:
            return None
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(more)


class PlainPrompt:
    """input() where prompt_toolkit is not installed (the `chat` extra): no editing, no history."""

    @staticmethod
    def prompt(text: str) -> str:
        return input(text)


def line_reader():
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
    except ImportError:
        return PlainPrompt()
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return PromptSession(history=FileHistory(str(path)))
    except OSError:   # no writable home: edit lines, keep no history
        return PromptSession()


def interactive(session: Session) -> int:
    prompts = line_reader()
    session.load()
    while True:
        try:
            text = read_message(prompts)
        except KeyboardInterrupt:
            session._write("Use Ctrl + d or /bye to exit.\n")
            continue
        if text is None:
            return 0
        if not text.strip():
            continue
        try:
            if text.lstrip().startswith("/"):
                if not session.command(text.strip()):
                    return 0
            else:
                session.ask(text)
        except EngineError as e:
            session._write(f"error: {e}\n", to=sys.stderr)

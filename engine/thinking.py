"""Reasoning apart from the answer: DeepSeek-R1 distills think inside <think>...</think>.

`ThinkingParser` splits streamed text into thinking and answer as Ollama's parser does (its
state machine in thinking/parser.go, re-derived here): whitespace before the opening tag and
after each tag is dropped; text before any opening tag is answer; a tag split across pieces is
held back until it can be told apart. The distills' chat template ends the prompt with the
opening tag, so the model usually writes only the closing one: `opened=True` starts inside the
thinking.
"""
OPENING, CLOSING = "<think>", "</think>"

# states, in the order a reply passes through them
BEFORE_OPENING = "before the opening tag"
OPENED = "just after the opening tag"     # whitespace there is dropped
THINKING = "thinking"
CLOSED = "just after the closing tag"     # whitespace there is dropped
ANSWER = "answer"


def _held_back(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a beginning of `tag` (maybe the tag, cut)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkingParser:
    def __init__(self, opened: bool = False, opening: str = OPENING, closing: str = CLOSING):
        self.opening, self.closing = opening, closing
        self.state = OPENED if opened else BEFORE_OPENING
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, answer) that `text` completes; a possible tag's beginning is held back."""
        self.pending += text
        thinking, answer = [], []
        while True:
            more, think, say = self._step()
            thinking.append(think)
            answer.append(say)
            if not more:
                return "".join(thinking), "".join(answer)

    def flush(self) -> tuple[str, str]:
        """What is still held back when the reply ends: inside the thinking it was thinking (a
        closing tag that never completed); before any tag it was answer."""
        rest, self.pending = self.pending, ""
        if self.state in (OPENED, THINKING):
            return rest, ""
        return "", rest if self.state in (BEFORE_OPENING, ANSWER) else rest.lstrip()

    def _step(self) -> tuple[bool, str, str]:
        """One transition: (whether to step again, thinking, answer)."""
        text = self.pending
        stripped = text.lstrip()
        if self.state == BEFORE_OPENING:
            if stripped.startswith(self.opening):
                self.pending = stripped[len(self.opening):].lstrip()
                self.state = THINKING if self.pending else OPENED
                return True, "", ""
            if self.opening.startswith(stripped):   # nothing yet, or the tag's beginning
                return False, "", ""
            self.state, self.pending = ANSWER, ""
            return False, "", text
        if self.state == OPENED:
            if not stripped:   # whitespace after the tag is dropped, however it arrives
                self.pending = ""
                return False, "", ""
            self.state, self.pending = THINKING, stripped
            return True, "", ""
        if self.state == THINKING:
            end = text.find(self.closing)
            if end >= 0:
                after = text[end + len(self.closing):].lstrip()
                self.state, self.pending = (ANSWER if after else CLOSED), ""
                return False, text[:end], after
            keep = _held_back(text, self.closing)
            self.pending = text[len(text) - keep:]
            return False, text[:len(text) - keep], ""
        if self.state == CLOSED:
            self.pending = ""
            if stripped:
                self.state = ANSWER
            return False, "", stripped
        self.pending = ""
        return False, "", text

"""The thinking parser (engine/thinking.py): thinking and answer apart, as Ollama splits them,
however the stream is cut into pieces."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.thinking import ThinkingParser

CASES = [
    # (text, prompt opened the block, thinking, answer)
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.\n", "Paris."),
    ("Let me see.</think>\n\nParis.", True, "Let me see.", "Paris."),
    ("\n\n  Let me see.\n</think>Paris.", True, "Let me see.\n", "Paris."),
    ("  \n<think></think>Paris.", False, "", "Paris."),
    ("<think>\n\n</think>\n\n", False, "", ""),
    ("Paris, <think>no</think> is the answer.", False, "", "Paris, <think>no</think> is the answer."),
    ("Paris.", False, "", "Paris."),
    ("a < b and c </thin k", True, "a < b and c </thin k", ""),
    ("one </think> two </think> three", True, "one ", "two </think> three"),
    ("I stopped mid-tag </thi", True, "I stopped mid-tag </thi", ""),   # the end flushes it as thinking
    ("  <thi", False, "", "  <thi"),                                      # and as answer before any tag
    ("<think>only thinking, never closed", False, "only thinking, never closed", ""),
]


def run(pieces, opened):
    parser = ThinkingParser(opened=opened)
    thinking, answer = [], []
    for piece in pieces:
        think, say = parser.feed(piece)
        thinking.append(think)
        answer.append(say)
    think, say = parser.flush()
    return "".join(thinking) + think, "".join(answer) + say


@pytest.mark.parametrize("text, opened, thinking, answer", CASES)
def test_whole_text(text, opened, thinking, answer):
    assert run([text], opened) == (thinking, answer)


@pytest.mark.parametrize("text, opened, thinking, answer", CASES)
def test_every_split_point_and_character_by_character(text, opened, thinking, answer):
    for cut in range(len(text) + 1):
        assert run([text[:cut], text[cut:]], opened) == (thinking, answer), cut
    for first in range(len(text)):
        for second in range(first, len(text) + 1):
            assert run([text[:first], text[first:second], text[second:]], opened) == (thinking, answer)
    assert run(list(text), opened) == (thinking, answer)


def test_a_tag_is_never_emitted_before_it_can_be_told_apart():
    parser = ThinkingParser(opened=True)
    assert parser.feed("reasoning </") == ("reasoning ", "")
    assert parser.feed("thi") == ("", "")
    assert parser.feed("nk>") == ("", "")          # whitespace after the tag may still come
    assert parser.feed("\n\nAnswer") == ("", "Answer")
    assert parser.feed(" more") == ("", " more")


def test_whitespace_after_the_opening_tag_is_dropped_in_any_pieces():
    """(hypothesis found it: "<think>" then " " kept the space and flushed it as thinking)"""
    assert run(["<think>", " "], False) == run(["<think> "], False) == ("", "")
    assert run(["<think>", " ", "\n", "x"], False) == ("x", "")


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", " ", "\n", "a", "b c"]),
                      max_size=12),
       opened=st.booleans(), data=st.data())
def test_any_pieces_give_what_the_whole_gives(words, opened, data):
    text = "".join(words)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert run(pieces, opened) == run([text], opened)

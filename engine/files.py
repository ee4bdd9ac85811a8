"""Reading the small text files that come with a model (JSON side files, safetensors headers,
templates): whatever is in them, the result is the parsed value or an EngineError naming the
file, never a traceback.

They are downloaded files, so nothing in them is trusted: bytes that are not UTF-8, integers
with thousands of digits (Python refuses to convert them, or they overflow a float later),
nesting deep enough to exhaust the parser's recursion, a key given twice (which of the two
would a reader take?). The caller then checks each value's type and range where it reads it.
"""
import json
from pathlib import Path

from .errors import EngineError

# every file of a Hugging Face model directory besides its weights: what `tokenize` downloads,
# and what `quantize` copies into its output
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")
MAX_INTEGER_DIGITS = 30   # sizes, offsets and token ids fit in 20; anything longer is not one of ours


class _Malformed(Exception):
    pass


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _Malformed(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _object(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _Malformed(f"the key {duplicate!r} appears twice in one object")
    return result


def parse_json(data: bytes | str, what: str, kind: type | None = dict):
    """The JSON value in `data` (of `kind`, when given); `what` names the source in errors."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_int=_integer, object_pairs_hook=_object)
    except UnicodeDecodeError as e:
        raise EngineError(f"{what} is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{what} is not valid JSON: {e}") from None
    except _Malformed as e:
        raise EngineError(f"{what} is not usable JSON: {e}") from None
    except RecursionError:
        raise EngineError(f"{what} is not usable JSON: it is nested too deeply") from None
    if kind is not None and not isinstance(value, kind):
        expected = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}.get(kind, kind.__name__)
        raise EngineError(f"{what} must hold {expected}, not {type(value).__name__}")
    return value


def read_text(path: Path) -> str:
    """A text file that must be UTF-8."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EngineError(f"{path.name} is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise EngineError(f"{path.name} cannot be read: {e.strerror or e}") from None


def read_json(path: Path, kind: type | None = dict):
    """The JSON value of a file (of `kind`, when given)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EngineError(f"{path.name} cannot be read: {e.strerror or e}") from None
    return parse_json(data, path.name, kind)

"""Text <-> token ids: the `tokenizers` library on tokenizer.json, chat templates, streaming decode.

Chat templates are rendered by engine/template.py, as transformers' `apply_chat_template` does,
in a bounded sandbox. Rendered chat text already contains the BOS token, so it is encoded
without adding special tokens again: no double BOS.
"""
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from .errors import EngineError
from .files import read_json, read_text
from .template import ChatTemplate
from .thinking import CLOSING


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_text(text, what: str = "the text") -> None:
    """Text must be a str of valid Unicode: lone surrogates (what Python makes of bytes that are
    not UTF-8, in sys.argv for example) stop the tokenizer with a TypeError."""
    if not isinstance(text, str):
        raise EngineError(f"{what} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EngineError(f"{what} is not valid Unicode: character {e.start} is a lone surrogate "
                          f"(\\u{ord(text[e.start]):04x}; was it decoded from bytes that are not UTF-8?)") from None


ROLES = ("system", "user", "assistant", "tool")


def chat_messages(messages) -> list[dict]:
    """Messages as a chat template gets them, checked: a non-empty list of {"role", "content"}
    objects (or the ollama package's Message objects) with a known role and a string of valid
    Unicode. Earlier turns' reasoning is never sent back to the model: an assistant message keeps
    only what follows its closing tag (DeepSeek's template strips it too; others may not)."""
    if not isinstance(messages, (list, tuple)):
        raise EngineError(f"messages must be a list of messages, not {type(messages).__name__}")
    if not messages:
        raise EngineError("messages must hold at least one message")
    out = []
    for i, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        if not isinstance(message, dict):
            raise EngineError(f"message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise EngineError(f"message {i} has role {role!r}; supported: {', '.join(ROLES)}")
        if content is None:
            raise EngineError(f"message {i} has no 'content'")
        check_text(content, f"the content of message {i}")
        if role == "assistant" and CLOSING in content:   # cut as DeepSeek's template cuts it
            content = content.split(CLOSING)[-1]
        out.append({"role": role, "content": content})
    return out


def _check_dense(backend: HFTokenizer) -> None:
    """Token ids must run from 0 without gaps, as the model's embedding rows do. The library
    accepts any u32 id in tokenizer.json's vocabulary (2^31 included), and gives added tokens
    other ids than the file declares when the vocabulary has holes: a special token would then
    not be the one the model was trained with. n entries without a gap means ids 0..n-1."""
    count = backend.get_vocab_size(with_added_tokens=True)
    missing = next((i for i in range(count) if backend.id_to_token(i) is None), None)
    if missing is not None:
        raise EngineError(f"tokenizer.json: its {count} tokens do not have the ids 0..{count - 1} "
                          f"(no token has id {missing}); the vocabulary is damaged")


def _template_of(config: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (the
    "default" one is the chat template)."""
    template = config.get("chat_template")
    if isinstance(template, list) and all(isinstance(t, dict) for t in template):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise EngineError("tokenizer_config.json: 'chat_template' must be a string or a list of "
                          "{\"name\", \"template\"} objects")
    return template


class Tokenizer:
    def __init__(self, backend: HFTokenizer, chat_template: str | None = None, special_tokens: dict | None = None):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template_source = chat_template
        self._template = ChatTemplate(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"no tokenizer.json in {model_dir}")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises its own exception type
            raise EngineError(f"tokenizer.json could not be loaded: {e}") from None
        _check_dense(backend)
        config_path = model_dir / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        template_path = model_dir / "chat_template.jinja"
        template = read_text(template_path) if template_path.is_file() else _template_of(config)
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(backend, template, specials)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return self.backend.token_to_id(text) if text else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise EngineError("this model has no chat template; use raw mode (--raw) to feed plain text")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(chat_messages(messages), add_generation_prompt),
                           add_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces without ever emitting broken UTF-8.

    A character can span several byte-level tokens; until its last byte arrives, decoding ends
    in U+FFFD. So each step decodes a short window (a few tokens already emitted, for the
    context that decoders like SentencePiece's need, plus the new ones) and emits only the
    new part, once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix_offset = 0   # start of the window of already emitted tokens
        self.read_offset = 0     # first token not yet emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


# --- tokenizers built from GGUF metadata ---------------------------------------------------------

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as the original Hugging Face tokenizers define them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}.get(name)
    if split is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    if name == "smollm":   # digits one by one, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise EngineError(f"GGUF pre-tokenizer {name!r} is not supported; supported: qwen2, deepseek-r1-qwen, "
                      f"llama-bpe, smollm, gpt2, default")


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """A byte-level BPE tokenizer (GGUF `tokenizer.ggml.model` gpt2) from a GGUF file's metadata."""
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as Backend

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise EngineError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    tokens, merges = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not isinstance(merges, list) or types is None or len(types) != len(tokens):
        raise EngineError("GGUF tokenizer metadata needs tokens, token_type (as many) and merges")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    pairs = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        if not right or " " in right:
            raise EngineError(f"GGUF tokenizer merge {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    vocab = {token: i for i, token in enumerate(tokens)}
    try:
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    except Exception as e:   # the tokenizers library raises a bare Exception, e.g. for a merge of unknown tokens
        raise EngineError(f"GGUF tokenizer: {e}") from None
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    added = np.flatnonzero(np.isin(types, (TOKEN_CONTROL, TOKEN_USER_DEFINED))).tolist()
    backend.add_tokens([AddedToken(tokens[i], special=bool(types[i] == TOKEN_CONTROL), normalized=False)
                        for i in added])

    def token(key):
        i = metadata.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    bos = token("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    specials = {"bos_token": bos, "eos_token": token("tokenizer.ggml.eos_token_id"),
                "unk_token": token("tokenizer.ggml.unknown_token_id"),
                "pad_token": token("tokenizer.ggml.padding_token_id")}
    return Tokenizer(backend, metadata.get("tokenizer.chat_template"), specials)

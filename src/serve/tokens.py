"""Text in, token ids out, and back: the served model's tokenizer, its chat template, streaming detokenization.

A checkpoint served with ``--checkpoint`` brings its own tokenizer (``AutoTokenizer``, local files only). A
random-weight model (no checkpoint: the performance runs) gets a word-level tokenizer over its whole
vocabulary, ``w0 w1 ...``: text in and out is then the ids spelled as words, which keeps every route working
and tells nobody a story about what the random weights "said".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# A minimal template for tokenizers without one (ChatML-like, in plain words so that a word-level vocabulary
# can spell it when the tokens exist); a checkpoint's own template always wins.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose token i is the word ``w{i}``, split on white space, decoded joined by spaces. It
    names no special tokens: an added token "w2" would split "w20" into "w2" + "0" (the model's EOS ids come
    from its config, ``eos_ids``)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def load_tokenizer(checkpoint: str | None, vocab_size: int, chat_template: str | None = None):
    """The checkpoint's tokenizer (no hub access), else the word-level one; ``chat_template`` (a Jinja text)
    replaces the tokenizer's own when given."""
    if checkpoint:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"--checkpoint {checkpoint}: no usable tokenizer files ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); save one with the checkpoint") from None
    else:
        tok = word_tokenizer(vocab_size)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def eos_ids(tokenizer, config) -> tuple[int, ...]:
    """Token ids that end a sequence: the tokenizer's EOS and the model config's (one or a list)."""
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return tuple(sorted(ids))


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--chat-template {path}: {e.strerror}") from None


PREFIX_TOKENS = 8  # prompt tokens decoded with the output, so its first word gets its leading space


@dataclass
class Detokenizer:
    """A request's generated text, streamed: each ``push`` of token ids returns the new printable text.

    The output is decoded behind the prompt's last few tokens and the prompt's own text cut off, so the text
    is what follows the prompt in the decoded whole (" world", with its space; OpenAI's and vLLM's rule). The
    whole output is re-decoded each time (a token's text depends on its neighbours); a tail ending in an
    incomplete UTF-8 sequence (U+FFFD) is held back, and so is any tail that could still grow into a stop
    string; a stop string found ends the text before it (the stop string is not returned)."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    prefix: tuple[int, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already returned
    text: str = ""
    stopped: bool = False

    def __post_init__(self) -> None:
        self.prefix = tuple(self.prefix[-PREFIX_TOKENS:])
        self._prefix_len = len(self.tokenizer.decode(list(self.prefix), skip_special_tokens=True))

    def push(self, token_ids) -> str:
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        whole = self.tokenizer.decode([*self.prefix, *self.ids], skip_special_tokens=True)
        self.text = whole[self._prefix_len:]
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._emit(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        hold = max((len(s) for s in self.stop), default=1) - 1
        return self._emit(max(self.sent, safe - hold))

    def flush(self) -> str:
        """What is left once the sequence has ended (held-back text that did not become a stop string)."""
        return self._emit(len(self.text))

    def _stop_at(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop if s) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: int) -> str:
        new = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return new

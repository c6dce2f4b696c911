"""What the user asks the model to do: batch, prompt and generation lengths."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 32


@dataclass(frozen=True)
class Workload:
    prompt_len_tokens: int = DEFAULT_PROMPT_LEN
    gen_len_tokens: int = DEFAULT_GEN_LEN

    def __post_init__(self) -> None:
        if self.prompt_len_tokens < 1:
            raise ValueError(f"prompt length {self.prompt_len_tokens} < 1: pass --prompt-len 1 or more")
        if self.gen_len_tokens < 1:
            raise ValueError(f"generation length {self.gen_len_tokens} < 1: pass --gen-len 1 or more")

    @property
    def context_len_tokens(self) -> int:
        """Tokens in the KV cache at the end of generation."""
        return self.prompt_len_tokens + self.gen_len_tokens

    @property
    def mean_decode_context_tokens(self) -> float:
        """Average cache length over the decode steps (step i attends to prompt + i tokens)."""
        return self.prompt_len_tokens + (self.gen_len_tokens - 1) / 2.0

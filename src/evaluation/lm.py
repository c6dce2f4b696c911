"""``hpi``, an lm-evaluation-harness model (``TemplateLM``) scored by hpi's serving runtime.

It attaches to a running ``hpi serve`` (``url``) and speaks its ``/v1/completions`` with token-id prompts, so
the text is tokenized once, here, with the checkpoint's own tokenizer (what lm-eval's ``hf`` model does):

- log-likelihood: prefill-only requests (``max_tokens: 0``, ``echo``, ``logprobs: 1``); the runtime returns
  each prompt token's log-probability given the tokens before it (``SamplingParams.prompt_logprobs``), and the
  continuation's score is the sum over its tokens. Greedy means each continuation token's log-probability is
  the top one at its position. Requests go longest first, ``batch_size`` prompts per HTTP request (one engine
  request each: they share the KV slots and steps like any other load), as lm-eval's ``hf`` model orders them;
- rolling log-likelihood: lm-eval's own disjoint windows (``get_rolling_token_windows``, context 1) scored as
  above, exactly the ``hf`` model's windows, every document's together (longest first, ``batch_size`` a request);
- generate-until: greedy, ``max_tokens`` = the request's ``max_gen_toks``, the stop strings (with the EOS
  token's text added, as ``hf`` does) sent to the server; the generated token ids come back
  (``return_tokens_as_token_ids``) and are decoded here and cut at the first stop string, as ``hf`` does (the
  server's text is the continuation as decoded after the prompt: with a word-level tokenizer it starts with
  the space between them, which ``hf``'s decode of the new tokens alone has not).

Importing this module registers the name ``hpi`` with lm-eval (``lm_eval.api.registry.register_model``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


class ServerError(RuntimeError):
    """hpi serve answered with an error document (or not at all)."""


def request_json(url: str, body: dict[str, Any] | None, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    """GET ``url`` (``body`` None) or POST ``body`` to it; the answer's JSON."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise ServerError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except urllib.error.URLError as e:
        raise ServerError(f"{url} cannot be reached: {e.reason}") from None


def continuation_score(token_logprobs: list, top_logprobs: list, n_continuation: int) -> tuple[float, bool]:
    """Sum of the last ``n_continuation`` tokens' log-probabilities, and whether each was the top one."""
    lps = token_logprobs[-n_continuation:]
    tops = top_logprobs[-n_continuation:]
    greedy = all(lp >= max(top.values()) for lp, top in zip(lps, tops, strict=True))
    return float(sum(lps)), greedy


def by_length(requests: list) -> list[int]:
    """Indices of ``requests`` (``(key, context_enc, continuation_enc)``) longest first; ties keep order."""
    return sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))


@register_model("hpi")
class HpiLM(TemplateLM):
    """``url``: hpi serve's root (``http://127.0.0.1:8000``); ``tokenizer``: the checkpoint folder whose
    tokenizer the server uses; ``max_length``: tokens a scored window holds (the server's --max-model-len)."""

    def __init__(self, url: str, tokenizer: str, model: str | None = None, api_key: str | None = None,
                 batch_size: int | str = 16, max_length: int = DEFAULT_MAX_LENGTH,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, timeout: float = 600.0, add_bos_token: bool | None = None,
                 **_lm_eval_extras: Any) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.url = url.rstrip("/")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.model = model
        self.api_key = api_key
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.timeout_s = float(timeout)
        self.add_bos_token = add_bos_token  # None: the tokenizer's default, as lm-eval's hf model
        self.progress = None  # progress(request_type, done, total), set by hpi eval

    def _report(self, request_type: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(request_type, done, total)

    # ---- what TemplateLM needs ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's hf model encodes (huggingface.py ``tok_encode``): the tokenizer's own default (a Llama 3
        tokenizer adds BOS) unless ``add_special_tokens`` or ``add_bos_token`` says otherwise, and no second BOS
        when the text starts with one."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kwargs)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- the server -----------------------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The choices of one ``/v1/completions`` request, in prompt order."""
        if self.model is None:  # the one model the server serves
            self.model = request_json(f"{self.url}/v1/models", None, self.api_key, self.timeout_s)["data"][0]["id"]
        doc = request_json(f"{self.url}/v1/completions", {**body, "model": self.model}, self.api_key, self.timeout_s)
        return sorted(doc["choices"], key=lambda c: c["index"])

    def window(self, context_enc: list[int], continuation_enc: list[int]) -> list[int]:
        """The scored tokens: context + continuation, cut from the left to ``max_length`` (hf's window)."""
        return (context_enc + continuation_enc)[-self.max_length:]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, report_as: str = "loglikelihood",
                              **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = by_length(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            prompts = [self.window(requests[i][1], requests[i][2]) for i in batch]
            choices = self.complete({"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                     "temperature": 0})
            for i, choice in zip(batch, choices, strict=True):
                lp = choice["logprobs"]
                results[i] = continuation_score(lp["token_logprobs"], lp["top_logprobs"], len(requests[i][2]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            self._report(report_as, min(start + self.batch_size, len(order)), len(order))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every document's windows scored together, ``batch_size`` windows per HTTP request (as lm-eval's hf
        model batches them across documents); progress counts windows."""
        windows, owners = [], []
        for k, request in enumerate(requests):
            (string,) = request.args
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append((None,) + make_disjoint_window(w))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (score, _) in zip(owners, self._loglikelihood_tokens(windows, report_as="loglikelihood_rolling"),
                                 strict=True):
            totals[k] += score  # a document's windows in order, as the hf model sums them
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's temperature) up to the stop strings: requests that share their stop strings,
        length and temperature go ``batch_size`` prompts per HTTP request, as lm-eval's hf model batches the
        requests that share their generation arguments; the server decodes them together in its KV slots."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            prompt = self.tok_encode(context)[-(self.max_length - max_gen_toks):]
            groups.setdefault((tuple(until), max_gen_toks, kwargs.get("temperature", 0.0)), []).append((i, prompt))
        out: list[str] = [""] * len(requests)
        done = 0
        for (until, max_gen_toks, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                choices = self.complete({"prompt": [prompt for _, prompt in chunk], "max_tokens": max_gen_toks,
                                         "stop": list(until), "temperature": temperature, "logprobs": 0,
                                         "return_tokens_as_token_ids": True})
                for (i, _), choice in zip(chunk, choices, strict=True):
                    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
                    out[i] = postprocess_generated_text(self.tok_decode(ids), list(until), None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                done += len(chunk)
                self._report("generate_until", done, len(requests))
        return out

"""The hpi lm-eval model's own arithmetic, without a server: continuation scores, greedy flags, request order."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from hpi.evaluation.lm import by_length, continuation_score  # noqa: E402


def test_the_continuation_is_the_last_tokens_and_greedy_means_top_everywhere():
    token_logprobs = [None, -1.0, -0.5, -0.25]
    tops = [None, {"a": -0.1}, {"b": -0.5}, {"c": -0.25}]
    assert continuation_score(token_logprobs, tops, 2) == (-0.75, True)
    assert continuation_score(token_logprobs, tops, 3) == (-1.75, False)  # -1.0 was not the top (-0.1)


def test_requests_go_longest_first_and_ties_keep_their_order():
    requests = [(None, [1, 2], [3]), (None, [1], [2, 3, 4, 5]), (None, [1, 2, 3], [4]), (None, [9], [8, 7])]
    assert by_length(requests) == [1, 2, 0, 3]  # lengths 3, 5, 4, 3


def test_encoding_follows_hfs_rules_for_the_bos_token(tmp_path):
    """A tokenizer that adds BOS itself (as Llama 3's does): hf's encoding, which the hpi model must match."""
    pytest.importorskip("tokenizers")
    import tokenizers

    from hpi.evaluation.lm import HpiLM
    from hpi.evaluation.offline_tasks import task_tokenizer

    tok = task_tokenizer(300)
    tok.backend_tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(tmp_path)
    words = tok.encode("3 plus", add_special_tokens=False)
    lm = HpiLM(url="http://127.0.0.1:9", tokenizer=str(tmp_path))  # nothing is sent until a request is scored
    assert lm.tok_encode("3 plus") == [1, *words]  # the tokenizer's default adds BOS
    assert lm.tok_encode("<s> 3 plus") == [1, *words]  # ... but never a second one
    assert lm.tok_encode("3 plus", add_special_tokens=False) == words
    assert HpiLM(url="http://127.0.0.1:9", tokenizer=str(tmp_path), add_bos_token=False).tok_encode("3 plus") == words
    assert lm.prefix_token_id == 1 and lm.eot_token_id == 2

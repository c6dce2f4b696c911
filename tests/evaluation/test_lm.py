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

"""lm-evaluation-harness against a real ``hpi serve`` (CPU, fp32) on the offline tasks the repository keeps:
the ``hpi`` model (hpi.evaluation.lm) and lm-eval's own ``local-completions`` client, unchanged, both give lm-eval's
``hf`` model's scores on the same checkpoint, request by request (hpi.evaluation.parity)."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from hpi.evaluation.offline_tasks import TASK_NAMES, TASKS_DIR  # noqa: E402
from hpi.evaluation.parity import LOGLIKELIHOOD_TOLERANCE, compare  # noqa: E402

LIMIT = 20  # items per task: 80 choice requests, 20 rolling documents, 20 generations
MAX_MODEL_LEN = 256  # longer than every item (the longest counting run is ~65 words)


def evaluate(model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASK_NAMES), limit=LIMIT,
                                   batch_size=8, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                   log_samples=True, device="cpu")


@pytest.fixture(scope="module")
def eval_server(tmp_path_factory, task_checkpoint, sv):
    server = sv.start_server(tmp_path_factory.mktemp("eval-serve"), "--checkpoint", str(task_checkpoint),
                             "--max-model-len", str(MAX_MODEL_LEN))
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def hf_results(task_checkpoint):
    return evaluate("hf", f"pretrained={task_checkpoint},dtype=float32")


def assert_parity(results: dict, reference: dict) -> None:
    """Scores, every request's log-likelihood and every decision (argmax, greedy flag, generated text) agree."""
    parity = compare(results, reference)
    assert parity.ok, parity.failures()
    assert {r.task for r in parity.requests} == set(TASK_NAMES)
    by_task = {r.task: r for r in parity.requests}
    # every scored request was compared and agrees to fp32 rounding; every decision is the same
    assert len(by_task["hpi_arith_mc"].loglikelihood_deltas) == 4 * LIMIT
    assert len(by_task["hpi_count_ppl"].loglikelihood_deltas) == LIMIT
    assert by_task["hpi_arith_gen"].decisions == LIMIT
    for r in parity.requests:
        assert r.max_delta <= LOGLIKELIHOOD_TOLERANCE and r.agreement == 1.0, r
    assert all(s.delta == pytest.approx(0.0, abs=1e-6 * max(1.0, abs(s.reference))) for s in parity.scores)


def test_the_hpi_model_scores_the_offline_tasks_as_hf_does(eval_server, hf_results, task_checkpoint):
    import hpi.evaluation.lm  # noqa: F401 - registers "hpi" with lm-eval

    results = evaluate("hpi", f"url={eval_server.url},tokenizer={task_checkpoint},max_length={MAX_MODEL_LEN}")
    assert_parity(results, hf_results)
    generated = [s["resps"][0][0] for s in results["samples"]["hpi_arith_gen"]]
    assert all(generated), "every generation returned text"


def test_lm_evals_local_completions_works_against_hpi_serve_unchanged(eval_server, hf_results, task_checkpoint):
    results = evaluate("local-completions",
                       f"base_url={eval_server.url}/v1/completions,model={eval_server.model},"
                       f"tokenizer_backend=huggingface,tokenizer={task_checkpoint},max_length={MAX_MODEL_LEN}")
    # local-completions reads the server's text: the continuation as decoded after the prompt, which with a
    # word-level tokenizer starts with the space between them; hf decodes the new tokens alone. The tokens are
    # the same: exactly one leading space apart. The task's regex filter sees the same number either way.
    texts = [s["resps"][0][0] for s in results["samples"]["hpi_arith_gen"]]
    hf_texts = [s["resps"][0][0] for s in hf_results["samples"]["hpi_arith_gen"]]
    assert texts == [" " + t for t in hf_texts]
    for sample in results["samples"]["hpi_arith_gen"]:
        sample["resps"] = [[r[0][1:]] for r in sample["resps"]]
    assert_parity(results, hf_results)

"""A saved tiny-llama checkpoint whose tokenizer spells the offline tasks (hpi.evaluation.offline_tasks)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def task_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hpi.evaluation.offline_tasks import task_tokenizer
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint

    config = load_hf_config("tiny-llama")
    ckpt = save_checkpoint(config, seed=0, out_dir=tmp_path_factory.mktemp("eval-ckpt"), dtype=torch.float32,
                           shard_size_bytes=4 * 2**20)
    task_tokenizer(config.vocab_size).save_pretrained(ckpt)
    return ckpt

"""Fixtures shared by the executor tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def word_checkpoint(tmp_path_factory):
    """A local tiny-llama checkpoint (seed 0, fp32, several safetensors shards) with its own word-level
    tokenizer covering the whole vocabulary: "w{i}" is token i, words split on spaces, decoded joined by
    spaces. No pad, BOS or EOS token of its own (the pad id falls back to 0)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from hpi.executor.modeling import load_hf_config
    from hpi.executor.weights import save_checkpoint

    config = load_hf_config("tiny-llama")
    ckpt = save_checkpoint(config, seed=0, out_dir=tmp_path_factory.mktemp("ckpt"), dtype=torch.float32,
                           shard_size_bytes=4 * 2**20)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.save_pretrained(ckpt)
    return ckpt

"""The serving cache and its attention (``hpi.executor.slots``): a step that mixes prompt chunks of several
slots with decode tokens, and the all-slots decode a CUDA graph replays, give the logits transformers' own
model gives each sequence alone, for every family the executor builds (sliding window and learned positions
included). CPU, fp32."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hpi.executor.modeling import ShardSpec, build_stage  # noqa: E402
from hpi.executor.scheduler import Segment  # noqa: E402
from hpi.executor.slots import DenseDecode, RaggedStep, SlotKVCache  # noqa: E402
from hpi.executor.weights import full_state_dict  # noqa: E402

_spec = importlib.util.spec_from_file_location("tm", Path(__file__).with_name("test_modeling.py"))
tm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tm)
ATOL = 1e-5


def models(family: str):
    cfg = tm.tiny_config(family)
    stage = build_stage(cfg, ShardSpec.whole(cfg.num_hidden_layers), dtype=torch.float32, device="cpu", seed=0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ref.load_state_dict(full_state_dict(cfg, seed=0, dtype=torch.float32), strict=False)
    return cfg, stage, ref.eval()


def last_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0, -1].float()


def ragged(stage, cache, segments) -> torch.Tensor:
    """Run a ragged step; the logits of each segment's last token."""
    cache.bind(RaggedStep.build(segments, torch.device("cpu")))
    ids = torch.tensor([[t for s in segments for t in s.token_ids]])
    ends = torch.tensor([sum(s.n_tokens for s in segments[: i + 1]) - 1 for i in range(len(segments))])
    with torch.no_grad():
        return stage(ids, cache, None, logits_index=ends)


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_mixed_steps_and_dense_decode_equal_each_sequence_alone(family):
    cfg, stage, ref = models(family)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 12))
    cache = SlotKVCache(n_slots=4, max_len=32)
    # step 1: the first 4 tokens of a (slot 2) and all of b (slot 0)
    out = ragged(stage, cache, [Segment(2, 0, tuple(a[:4]), True), Segment(0, 0, tuple(b), True)])
    torch.testing.assert_close(out[0], last_logits(ref, a[:4]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], last_logits(ref, b), atol=ATOL, rtol=0)
    # step 2: b decodes one token, a's prompt goes on from position 4, c's whole prompt starts in slot 3
    out = ragged(stage, cache, [Segment(0, 5, (7,), True), Segment(2, 4, tuple(a[4:]), True),
                                Segment(3, 0, tuple(c), True)])
    for got, ids in zip(out, (b + [7], a, c)):
        torch.testing.assert_close(got, last_logits(ref, ids), atol=ATOL, rtol=0)
    # step 3: every slot decodes at once (slot 1 has no sequence: masked, its output ignored)
    cache.bind(DenseDecode(torch.tensor([6, 31, 9, 12])))
    with torch.no_grad():
        out = stage(torch.tensor([[17], [0], [11], [13]]), cache, None)
    for row, ids in ((0, b + [7, 17]), (2, a + [11]), (3, c + [13])):
        torch.testing.assert_close(out[row], last_logits(ref, ids), atol=ATOL, rtol=0)


def test_a_dense_step_of_one_slot_group_touches_only_its_slots():
    cfg, stage, ref = models("llama")
    cache = SlotKVCache(n_slots=4, max_len=16)
    ragged(stage, cache, [Segment(0, 0, (5, 6, 7), True), Segment(3, 0, (8, 9), True)])
    before = [k[:2].clone() for k in cache.keys]
    cache.bind(DenseDecode(torch.tensor([15, 2]), slot_offset=2))  # group 1 of 2: slots 2 and 3
    with torch.no_grad():
        out = stage(torch.tensor([[0], [4]]), cache, None)
    torch.testing.assert_close(out[1], last_logits(ref, [8, 9, 4]), atol=ATOL, rtol=0)
    assert all(torch.equal(k[:2], b) for k, b in zip(cache.keys, before))  # group 0's slots untouched


def test_a_step_needs_its_binding():
    cache = SlotKVCache(n_slots=1, max_len=4)
    with pytest.raises(RuntimeError, match="bind"):
        cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)
    with pytest.raises(ValueError, match="max_len"):
        SlotKVCache(n_slots=1, max_len=1)

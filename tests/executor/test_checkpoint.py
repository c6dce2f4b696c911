"""The planned checkpoint reader (hpi.executor.checkpoint, readplan, safetensors_header) against safetensors' own
``safe_open`` / ``get_slice``: the same values bit for bit, the bytes a rank reads, and clear refusals."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from transformers import MistralConfig, Qwen2Config  # noqa: E402

from hpi.executor.checkpoint import CheckpointReader, Target  # noqa: E402
from hpi.executor.modeling import ShardSpec, _head_dim, _kv_heads, build_stage, load_hf_config  # noqa: E402
from hpi.executor.readplan import Run, plan_chunks  # noqa: E402
from hpi.executor.safetensors_header import HeaderError, read_header  # noqa: E402
from hpi.executor.tp import Slice, shard_index  # noqa: E402
from hpi.executor.weights import INDEX_NAME, SliceReader, full_state_dict, param_table, write_checkpoint  # noqa: E402


def llama():
    """tiny-llama with biases everywhere (row-parallel ones too) and a vocab tp 2 must pad (301 rows)."""
    config = load_hf_config("tiny-llama")
    config.attention_bias = config.mlp_bias = True
    config.num_hidden_layers, config.vocab_size = 2, 301
    return config


def mistral():  # one kv head, replicated under tp 2; head_dim 24 != hidden / heads
    return MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=24, vocab_size=301, max_position_embeddings=128,
                         tie_word_embeddings=False)


def qwen2():  # tied LM head: the checkpoint has no lm_head.weight
    return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True, max_position_embeddings=128)


CONFIGS = {"llama": llama, "mistral": mistral, "qwen2": qwen2}


def checkpoint(config, folder: Path, dtype, strip: str = "") -> Path:
    """Seeded weights in several shards, non-constant norms and biases (so a misplaced byte shows); ``strip``
    leaves a name prefix out of the stored names (checkpoints saved from the base model)."""
    state = full_state_dict(config, seed=5, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=g).to(dtype) if v.dim() == 1 else v) for k, v in state.items()}
    state = {k.removeprefix(strip): v for k, v in state.items()}
    return write_checkpoint(state, config, folder, shard_size_bytes=40_000)


def parts(config, name: str, shape) -> list[Slice | None]:
    """Every slice a layout asks for: whole, each tp-2 rank's, and both halves along every dim."""
    heads = dict(n_heads=config.num_attention_heads, n_kv_heads=_kv_heads(config), head_dim=_head_dim(config))
    out = [None] + [shard_index(name, shape, tp_rank=r, tp_size=2, **heads) for r in range(2)]
    for dim, n in enumerate(shape):
        out += [Slice(dim, 0, n // 2, n // 2), Slice(dim, n // 2, n, n - n // 2)]
    return out


def reference(folder: Path, stored: str, part: Slice | None):
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    with safe_open(str(folder / index[stored]), framework="pt", device="cpu") as f:
        return f.get_tensor(stored) if part is None else part.pad(f.get_slice(stored)[part.index()])


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("direct", [False, True])
def test_reads_equal_get_slice_bit_for_bit(family, dtype, direct, tmp_path):
    """Full tensors, column and row slices (both read rules), the padded LM head slice, the tied head."""
    config = CONFIGS[family]()
    folder = checkpoint(config, tmp_path, dtype)
    assert len(list(folder.glob("*.safetensors"))) > 2
    readers = [CheckpointReader(folder, config, direct=direct, chunk_bytes=8192, buffers=2),
               CheckpointReader(folder, config, direct=direct, skip_gap_bytes=0)]
    padded = 0
    for name, info in param_table(config).items():
        stored = readers[0].resolve(name)
        for part in parts(config, name, info.shape):
            want = reference(folder, stored, part)
            padded += part is not None and part.padded > part.stop - part.start
            for reader in readers:
                got = reader.read(name, part)
                assert got.dtype == dtype and torch.equal(got, want), (name, part, reader.skip_gap_bytes)
    assert padded == (0 if family == "qwen2" else 1)  # the LM head of 301 rows, tp 2 rank 1
    if family == "qwen2":
        assert readers[0].resolve("lm_head.weight") == "model.embed_tokens.weight"


def test_prefix_less_names_resolve(tmp_path):
    config = llama()
    folder = checkpoint(config, tmp_path, torch.float32, strip="model.")
    reader = CheckpointReader(folder, config)
    name = "model.layers.1.mlp.down_proj.weight"
    part = Slice(1, 88, 176, 88)
    assert torch.equal(reader.read(name, part), reference(folder, "layers.1.mlp.down_proj.weight", part))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_whole_stage_fills_in_small_chunks_as_the_slice_reader_does(dtype, tmp_path):
    """Every stage parameter of each tp-2 rank through build_stage: staging buffers of 32 KiB cut runs inside files
    and (fp32: the 45 KiB down_proj) a row-cut tensor between its rows; O_DIRECT; a bf16 checkpoint into a float32
    stage converts."""
    config = llama()
    folder = checkpoint(config, tmp_path, dtype)
    for rank in range(2):
        shard = ShardSpec.for_stage([1, 1], 1, tp_rank=rank, tp_size=2)
        want = build_stage(config, shard, dtype=torch.float32, checkpoint=SliceReader(folder, config))
        reader = CheckpointReader(folder, config, chunk_bytes=8192, buffers=3, workers=2, direct=True)
        got = build_stage(config, shard, dtype=torch.float32, checkpoint=reader)
        assert reader.bytes_read > 0
        for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
            assert torch.equal(a, b), (rank, name)


def test_a_tied_head_and_its_embedding_in_one_stage_read_their_bytes_once(tmp_path):
    """qwen2's LM head is the embedding: in one stage both targets cover the same bytes (tp 2: the head's half
    inside the embedding), read once and placed twice."""
    config = qwen2()
    folder = checkpoint(config, tmp_path, torch.float32)
    for tp_rank, tp_size in ((0, 1), (1, 2)):
        shard = ShardSpec.whole(2, tp_rank, tp_size)
        want = build_stage(config, shard, dtype=torch.float32, checkpoint=SliceReader(folder, config))
        reader = CheckpointReader(folder, config)
        got = build_stage(config, shard, dtype=torch.float32, checkpoint=reader)
        for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
            assert torch.equal(a, b), (tp_size, name)
        embed = read_header(folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][
            "model.embed_tokens.weight"])["model.embed_tokens.weight"]
        assert reader.planned_bytes["lm_head.weight"] == embed.nbytes // tp_size
        assert reader.bytes_read < sum(reader.planned_bytes.values())  # the head's bytes were not read again


def test_o_direct_falls_back_to_buffered_reads_where_the_filesystem_refuses_it(tmp_path, monkeypatch):
    """tmpfs refuses O_DIRECT at open (EINVAL): the reader reads buffered from then on, the same values."""
    import errno
    import os

    config = llama()
    folder = checkpoint(config, tmp_path, torch.float32)
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    reader = CheckpointReader(folder, config, direct=True)
    name, part = "model.layers.1.mlp.down_proj.weight", Slice(1, 0, 88, 88)
    assert torch.equal(reader.read(name, part), reference(folder, name, part))
    assert reader.direct is False


def test_staging_stays_within_its_buffers_whatever_the_checkpoint_size(tmp_path):
    """A checkpoint 8x the staging memory: two 32 KiB buffers are all the host holds besides the targets."""
    config = llama()
    folder = checkpoint(config, tmp_path, torch.float32)
    reader = CheckpointReader(folder, config, chunk_bytes=8192, buffers=2)
    stage = build_stage(config, ShardSpec.whole(2), dtype=torch.float32, checkpoint=reader)
    held = sum(p.numel() * 4 for p in stage.parameters())
    assert reader.bytes_read == held > 8 * 2 * 32768
    reader = CheckpointReader(folder, config, chunk_bytes=8192, buffers=2)
    reader.fill([Target(n, n, None, torch.empty_like(p)) for n, p in
                 zip(stage.hf_names.values(), stage.parameters())])
    assert [b.numel() for b in reader._staging[False]] == [32768, 32768]


def sliced_bytes(config, names, tp_rank: int, tp_size: int) -> int:
    """Bytes of the slices a rank holds (a tensor it holds whole: all of it; the padding: nothing)."""
    table, total = param_table(config), 0
    heads = dict(n_heads=config.num_attention_heads, n_kv_heads=_kv_heads(config), head_dim=_head_dim(config))
    for name in names:
        shape = table[name].shape
        part = shard_index(name, shape, tp_rank=tp_rank, tp_size=tp_size, **heads)
        full = math.prod(shape) * 4
        total += full if part is None else full // shape[part.dim] * (part.stop - part.start)
    return total


def test_a_tp_rank_reads_its_slices_and_no_other_byte(tmp_path):
    """With every gap skipped (``skip_gap_bytes=0``) a rank reads exactly its slices: tp 2 rank 0 and rank 1 the
    same bytes, each sharded tensor's half, a replicated one whole; only the stage's own files are opened. One
    rank of the whole model reads the checkpoint's data once."""
    config = llama()
    folder = checkpoint(config, tmp_path, torch.float32)
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    table = param_table(config)
    got = {}
    for tp_rank, tp_size in ((0, 1), (0, 2), (1, 2)):
        reader = CheckpointReader(folder, config, skip_gap_bytes=0)
        stage = build_stage(config, ShardSpec.for_stage([1, 1], 1, tp_rank=tp_rank, tp_size=tp_size),
                            dtype=torch.float32, checkpoint=reader)
        wanted = set(stage.hf_names.values())
        assert set(reader.planned_bytes) == wanted  # only this stage's tensors
        assert set(reader.files_read) == {index[n] for n in wanted}  # no other file touched
        assert reader.bytes_read == sum(reader.planned_bytes.values()) == sliced_bytes(config, wanted, tp_rank,
                                                                                         tp_size)
        for name, planned in reader.planned_bytes.items():
            full = math.prod(table[name].shape) * 4
            cut = shard_index(name, table[name].shape, tp_rank=tp_rank, tp_size=tp_size, n_heads=4, n_kv_heads=2,
                              head_dim=16)
            assert planned == (full if cut is None else full * (cut.stop - cut.start) // table[name].shape[cut.dim])
        got[tp_rank, tp_size] = reader.bytes_read
    assert got[0, 2] == got[1, 2] + 64 * 4 < got[0, 1]  # 301 vocab rows: 151 on rank 0, 150 and a pad row on rank 1
    data = sum(e.nbytes for f in folder.glob("*.safetensors") for e in read_header(f).values())
    reader = CheckpointReader(folder, config)
    build_stage(config, ShardSpec.whole(2), dtype=torch.float32, checkpoint=reader)
    assert reader.bytes_read == data  # every byte of data once: no header, no tied copy read twice


def test_the_default_rule_reads_a_row_parallel_slice_whole_and_a_column_slice_as_its_rows(tmp_path):
    """Under the default rule (gaps under 1 MiB are read through) a tp-2 rank of an up/down pair [1024, 512] /
    [512, 1024] fp32 reads half the up projection (its 1 MiB gap is skipped) and all of the down projection
    (each row's gap is 2 KiB): 3 of the 4 MiB; every gap skipped instead, 2 MiB in 512 row reads."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {"x.up_proj.weight": torch.randn(1024, 512, generator=g), "x.down_proj.weight": torch.randn(512, 1024,
                                                                                                         generator=g)}
    save_file(state, str(tmp_path / "model.safetensors"))
    heads = dict(n_heads=4, n_kv_heads=4, head_dim=16, tp_size=2)
    for skip_gap_bytes, mib in ((2**20, 3), (0, 2)):
        for rank in range(2):
            reader = CheckpointReader(tmp_path, skip_gap_bytes=skip_gap_bytes)
            cuts = {n: shard_index(n, t.shape, tp_rank=rank, **heads) for n, t in state.items()}
            targets = [Target(n, n, cut, torch.zeros_like(cut.apply(state[n]))) for n, cut in cuts.items()]
            reader.fill(targets)
            assert reader.bytes_read == mib * 2**20
            for t in targets:
                assert torch.equal(t.tensor, t.part.apply(state[t.name])), (t.name, rank)


def test_chunks_never_split_an_outer_row_of_a_cut_run():
    """A row-cut tensor of 10 rows x 1000 bytes in a 4 KiB-page buffer of 12 KiB: each piece whole rows, the
    pieces cover the run once, in file order, and a flat neighbour is split anywhere on an element."""
    runs = [Run(0, 100, 10_100, 1000, cut=True), Run(1, 10_100, 30_100, 4, cut=False)]
    chunks = plan_chunks("f", runs, buffer_bytes=12 * 1024)
    assert len(chunks) > 2
    for target, granule in ((0, 1000), (1, 4)):
        pieces = [p for c in chunks for p in c.pieces if p.run.target == target]
        assert pieces[0].start_byte == runs[target].start_byte and pieces[-1].stop_byte == runs[target].stop_byte
        assert all(a.stop_byte == b.start_byte for a, b in zip(pieces, pieces[1:]))
        assert all((p.start_byte - runs[target].start_byte) % granule == 0 for p in pieces)
    for c in chunks:
        assert c.used_bytes <= 12 * 1024
        assert all(s.buf_offset % 4096 == s.read_start % 4096 for s in c.segments)  # the file's alignment kept


def test_fill_refuses_a_target_of_another_shape(tmp_path):
    config = llama()
    folder = checkpoint(config, tmp_path, torch.float32)
    reader = CheckpointReader(folder, config)
    wrong = Target("layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight", None, torch.empty(3, 3))
    with pytest.raises(ValueError, match=r"slice has shape \(176, 64\), stage parameter layers.0.mlp.up_proj.weight"):
        reader.fill([wrong])
    assert reader.bytes_read == 0  # refused before reading


# ---- bad files --------------------------------------------------------------------------------------
def one_file(tmp_path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def test_a_truncated_file_is_named(tmp_path):
    path = one_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(HeaderError, match=rf"{path}: tensor 'w' ends at byte \d+ but the file has \d+ bytes: the "
                                          "file is truncated"):
        CheckpointReader(tmp_path).read("w", None)


def test_a_header_that_lies_about_sizes_is_named(tmp_path):
    path = one_file(tmp_path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].replace(b'"shape":[8,8]', b'"shape":[8,9]')
    assert header != raw[8:8 + n]
    path.write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(HeaderError, match=rf"{path}: tensor 'w': data_offsets 0..256 hold 256 bytes but shape "
                                          r"\[8, 9\] x F32 needs 288: the header lies about its sizes"):
        read_header(path)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(HeaderError, match=rf"{path}: header length 1000000 \+ 8 > file size 10"):
        CheckpointReader(tmp_path)

"""Reading a local HF safetensors checkpoint at the disk's rate: every target of a stage planned up front, each
file read once in file order with large reads, the bytes cut into the targets where they will live.

``CheckpointReader.fill(targets)`` takes every (name, slice, destination tensor) of a stage, parses each file's
header (``hpi.executor.safetensors_header``), plans this rank's byte ranges (``hpi.executor.readplan``: the
rule for row-parallel slices is there), and runs the chunks through a few staging buffers:

- a thread pool reads the chunks ahead (``os.preadv`` into a preallocated buffer, which releases the GIL), several
  at once, so the disk always has reads queued; ``buffers`` staging buffers of ``chunk_bytes`` bound the host
  memory (the default 8 x 32 MiB = 256 MiB, whatever the checkpoint's size). Where the destinations are in host
  memory (offloaded builds) the worker that read a chunk also copies it into them, so the copies run in parallel;
- where the destinations are on a GPU the staging buffers are pinned, each chunk goes to the GPU in one
  ``non_blocking`` copy and the slices are cut there (``view`` + ``narrow`` + ``copy_``); a CUDA event tells a
  worker when its pinned buffer may be refilled;
- reads are buffered by default: ranks of one host that read the same file share the page cache, so the
  disk reads each byte once however many ranks cut it. ``direct=True`` opens files with ``O_DIRECT`` (reads
  rounded out to 4 KiB, buffers page-aligned) and falls back to buffered reads where the filesystem refuses it.

``bytes_read`` counts what this reader read (``files_read`` per file; ``planned_bytes`` per tensor: the bytes its
own ranges cover, before gaps are merged in), so tests can check that a rank reads its slices and no more.
``read(name, part)`` is the one-tensor form of the same path: the same values as safetensors'
``get_slice(name)[part.index()]``, bit for bit, in the checkpoint's dtype on the CPU.
"""

from __future__ import annotations

import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from hpi.executor.readplan import PAGE, SKIP_GAP_BYTES, Chunk, Piece, buffer_bytes_for, plan_chunks, runs_of
from hpi.executor.safetensors_header import INDEX_NAME, SINGLE_NAME, TensorEntry, checkpoint_files, read_header
from hpi.executor.tp import Slice

__all__ = ["INDEX_NAME", "SINGLE_NAME", "TORCH_DTYPES", "CheckpointFiles", "CheckpointReader", "Target",
           "fill_by_reads", "open_checkpoint"]

TORCH_DTYPES: dict[str, torch.dtype] = {  # safetensors' dtype names -> torch's (safetensors/torch.py's table)
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Target:
    """One stage tensor to fill: its stage name (for messages), its HF name, the slice this rank holds of it."""

    name: str
    hf_name: str
    part: Slice | None
    tensor: torch.Tensor

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(self.tensor.shape):
            raise ValueError(f"{self.hf_name}: slice has shape {tuple(shape)}, stage parameter "
                             f"{self.name} has {tuple(self.tensor.shape)}")


def fill_by_reads(source, targets: list[Target]) -> None:
    """Fill each target with ``source.read(hf_name, part)``, one at a time (sources with no plan of their own)."""
    for t in targets:
        value = source.read(t.hf_name, t.part)
        t.check_shape(tuple(value.shape))
        t.tensor.copy_(value)
        del value


class CheckpointFiles:
    """A checkpoint directory's files and names: which file holds each tensor, and the name it is stored under."""

    def __init__(self, path: str | os.PathLike, config=None):
        if getattr(config, "quantization_config", None):  # FP8 blocks copied into 16-bit weights lose their scales
            raise NotImplementedError(f"{path}: the checkpoint's weights are quantized (config.json's "
                                      "quantization_config); only 16/32-bit checkpoints load: dequantize it first")
        self.path = Path(path)
        self.weight_map = self._weight_map()
        self._tied_source: str | None = None
        self._base = "model."  # the base model's attribute, which checkpoints of the base model leave out
        if config is not None:
            from hpi.executor.modeling import family_of

            fam = family_of(config)
            self._base = fam.prefix.split(".", 1)[0] + "."  # "model." / BLOOM's "transformer."
            if getattr(config, "tie_word_embeddings", False):
                self._tied_source = fam.embed_weight

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        return {name: f.name for f in checkpoint_files(self.path) for name in read_header(f)}

    def resolve(self, name: str) -> str:
        """The name the checkpoint stores ``name`` under (prefix-less old OPT files and bigscience's BLOOM files,
        saved from the base model; tied LM head)."""
        if name in self.weight_map:
            return name
        if name.startswith(self._base) and name[len(self._base):] in self.weight_map:
            return name[len(self._base):]
        if name == "lm_head.weight" and self._tied_source is not None:
            return self.resolve(self._tied_source)
        raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")

    def fill(self, targets: list[Target]) -> None:
        fill_by_reads(self, targets)


def open_checkpoint(checkpoint, config):
    """A reader for ``checkpoint``: a directory (``CheckpointReader``), or a reader made by the caller."""
    return checkpoint if hasattr(checkpoint, "fill") else CheckpointReader(checkpoint, config)


def _sliced_shape(entry: TensorEntry, part: Slice | None) -> tuple[int, ...]:
    shape = list(entry.shape)
    if part is not None:
        shape[part.dim] = part.padded
    return tuple(shape)


class CheckpointReader(CheckpointFiles):
    """Planned, pipelined reads of a safetensors checkpoint (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, config=None, *, chunk_bytes: int = 32 * 2**20, buffers: int = 8,
                 workers: int = 4, skip_gap_bytes: int = SKIP_GAP_BYTES, direct: bool = False):
        super().__init__(path, config)
        self.chunk_bytes, self.buffers, self.workers = chunk_bytes, buffers, workers
        self.skip_gap_bytes, self.direct = skip_gap_bytes, direct
        self.bytes_read = 0
        self.files_read: dict[str, int] = {}
        self.planned_bytes: dict[str, int] = {}  # per tensor (HF name): the bytes its runs cover
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        self._staging: dict[bool, list[torch.Tensor]] = {}

    def entry(self, name: str) -> tuple[str, TensorEntry]:
        """The file holding ``name`` and its header entry."""
        stored = self.resolve(name)
        fname = self.weight_map[stored]
        if fname not in self._headers:
            self._headers[fname] = read_header(self.path / fname)
        header = self._headers[fname]
        if stored not in header:
            raise KeyError(f"{self.path / fname}: the index puts {stored!r} in this file, its header does not")
        return fname, header[stored]

    def read(self, name: str, part: Slice | None) -> torch.Tensor:
        _, entry = self.entry(name)
        out = torch.empty(_sliced_shape(entry, part), dtype=TORCH_DTYPES[entry.dtype])
        self.fill([Target(name, name, part, out)])
        return out

    def fill(self, targets: list[Target]) -> None:
        """Read every target's values into its tensor (converted to the tensor's dtype where they differ)."""
        entries = [self.entry(t.hf_name) for t in targets]
        for t, (_, e) in zip(targets, entries):
            t.check_shape(_sliced_shape(e, t.part))
        dense = [t.tensor if t.tensor.is_contiguous() else torch.empty_like(t.tensor,
                                                                            memory_format=torch.contiguous_format)
                 for t in targets]
        for t, d in zip(targets, dense):
            if t.part is not None and t.part.stop - t.part.start < t.part.padded:
                d.narrow(t.part.dim, t.part.stop - t.part.start, t.part.padded - t.part.stop + t.part.start).zero_()
        runs: dict[str, list] = {}
        for i, (t, (fname, e)) in enumerate(zip(targets, entries)):
            mine = runs_of(i, e, t.part, self.skip_gap_bytes)
            runs.setdefault(fname, []).extend(mine)
            self.planned_bytes[t.hf_name] = self.planned_bytes.get(t.hf_name, 0) + sum(
                r.stop_byte - r.start_byte for r in mine)
        buffer_bytes = buffer_bytes_for([r for rs in runs.values() for r in rs], self.chunk_bytes)
        align = PAGE if self.direct else 1
        chunks = [c for fname in sorted(runs) for c in plan_chunks(fname, runs[fname], buffer_bytes,
                                                                    self.skip_gap_bytes, align)]
        self._run(chunks, buffer_bytes, [(t.part, e) for t, (_, e) in zip(targets, entries)], dense)
        for t, d in zip(targets, dense):
            if d is not t.tensor:
                t.tensor.copy_(d)

    # ---- execution -------------------------------------------------------------------------------------
    def _buffers(self, n: int, nbytes: int, pinned: bool) -> list[torch.Tensor]:
        """``n`` page-aligned staging buffers of ``nbytes`` (kept for the next call until ``close``)."""
        have = self._staging.get(pinned, [])
        if len(have) < n or (have and have[0].numel() < nbytes):
            have = []
            for _ in range(n):  # pinned blocks come page-aligned and rounded up to a power of two: ask for one
                raw = torch.empty(nbytes if pinned else nbytes + PAGE, dtype=torch.uint8, pin_memory=pinned)
                skip = -raw.data_ptr() % PAGE
                if skip + nbytes > raw.numel():
                    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pinned)
                    skip = -raw.data_ptr() % PAGE
                have.append(raw[skip:skip + nbytes])
            self._staging[pinned] = have
        return have[:n]

    def _run(self, chunks: list[Chunk], buffer_bytes: int, slices, dsts: list[torch.Tensor]) -> None:
        if not chunks:
            return
        device = dsts[chunks[0].pieces[0].run.target].device
        cuda = device.type == "cuda"
        n = min(self.buffers, len(chunks))
        host = self._buffers(n, buffer_bytes, pinned=cuda)
        gpu = [torch.empty(buffer_bytes, dtype=torch.uint8, device=device) for _ in range(min(2, n))] if cuda else []
        events: list = [None] * n
        futures: dict[int, Future] = {}
        place = None if cuda else (lambda chunk, staged: _place_chunk(chunk, staged, slices, dsts))
        with ThreadPoolExecutor(max_workers=max(1, self.workers), thread_name_prefix="hpi-read") as pool:
            def submit(i: int) -> None:
                futures[i] = pool.submit(self._read_chunk, chunks[i], host[i % n], events[i % n], place)

            for i in range(n):
                submit(i)
            try:
                for i, chunk in enumerate(chunks):
                    got = futures.pop(i).result()
                    self.bytes_read += got
                    self.files_read[chunk.file] = self.files_read.get(chunk.file, 0) + got
                    if cuda:  # one copy to the GPU, the cuts made there; CPU targets were filled by the worker
                        on_gpu = gpu[i % len(gpu)]
                        on_gpu[:chunk.used_bytes].copy_(host[i % n][:chunk.used_bytes], non_blocking=True)
                        events[i % n] = torch.cuda.Event()
                        events[i % n].record(torch.cuda.current_stream(device))  # the stream copy_ used
                        _place_chunk(chunk, on_gpu, slices, dsts)
                    if i + n < len(chunks):
                        submit(i + n)
            finally:
                for f in futures.values():
                    f.cancel()

    def _open(self, fname: str) -> int:
        path = str(self.path / fname)
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False  # this filesystem refuses O_DIRECT (tmpfs): buffered from here on
        return os.open(path, os.O_RDONLY)

    def _read_chunk(self, chunk: Chunk, buf: torch.Tensor, reuse_after, place) -> int:
        """Read a chunk's segments into ``buf`` and ``place`` them (a worker thread: CPU targets' copies run in
        parallel, each chunk's pieces go to their own bytes of the targets); returns the bytes read."""
        if reuse_after is not None:
            reuse_after.synchronize()  # the last GPU copy out of this pinned buffer is done
        view = memoryview(buf.numpy())
        fd = self._open(chunk.file)
        total = 0
        try:
            for seg in chunk.segments:
                try:
                    got = _read_fully(fd, view[seg.buf_offset:seg.buf_offset + seg.nbytes], seg.read_start)
                except OSError as e:  # a filesystem that opens with O_DIRECT but refuses the read: buffered
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    self.direct = False
                    os.close(fd)
                    fd = self._open(chunk.file)
                    got = _read_fully(fd, view[seg.buf_offset:seg.buf_offset + seg.nbytes], seg.read_start)
                need = seg.data_stop - seg.read_start
                if got < need:
                    raise ValueError(f"{self.path / chunk.file}: read {got} bytes at offset {seg.read_start}, "
                                     f"the header needs {need}: the file is shorter than its header says "
                                     "(truncated: copy or download it again)")
                total += got
        finally:
            os.close(fd)
        if place is not None:
            place(chunk, buf)
        return total

    def close(self) -> None:
        pinned = bool(self._staging.get(True))
        self._staging.clear()
        if pinned and torch.cuda.is_available():  # torch caches freed pinned blocks: give them back to the host
            empty = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # torch >= 2.12
                     or getattr(torch._C, "_host_emptyCache", None))  # CUDA builds since 2.5
            if empty is not None:
                empty()


def _read_fully(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _typed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Staged bytes viewed as ``dtype`` (a copy only where the file put the tensor at an unaligned offset)."""
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone().view(dtype)


def _place_chunk(chunk: Chunk, staged: torch.Tensor, slices, dsts: list[torch.Tensor]) -> None:
    with torch.no_grad():  # grad mode is per thread: a worker does not inherit the caller's no_grad
        for piece in chunk.pieces:
            part, entry = slices[piece.run.target]
            _place(piece, staged, entry, part, dsts[piece.run.target])


def _place(piece: Piece, staged: torch.Tensor, entry: TensorEntry, part: Slice | None, dst: torch.Tensor) -> None:
    """Copy one piece of staged bytes into its target: in order (``flat``), or cut along the slice's dim."""
    run, nbytes = piece.run, piece.stop_byte - piece.start_byte
    src = _typed(staged[piece.buf_index:piece.buf_index + nbytes], TORCH_DTYPES[entry.dtype])
    if not run.cut:
        first = run.dst_elem + (piece.start_byte - run.start_byte) // entry.itemsize_bytes
        dst.view(-1)[first:first + src.numel()].copy_(src)
        return
    size, inner = entry.shape[part.dim], entry.block_bytes(part.dim) // entry.itemsize_bytes
    first_row, rows = (piece.start_byte - run.start_byte) // run.granule_bytes, nbytes // run.granule_bytes
    held = part.stop - part.start
    block = src.view(rows, size, inner).narrow(1, part.start, held)
    dst.view(-1, part.padded, inner).narrow(0, first_row, rows).narrow(1, 0, held).copy_(block)

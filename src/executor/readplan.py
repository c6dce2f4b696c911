"""Which bytes of a checkpoint one rank reads, planned before any is read: runs per target, merged per file, cut
into chunks that fit one staging buffer.

A *run* is a byte range of one file bound for one target tensor. A full tensor, or a slice along its first
dimension (column-parallel weights, the vocab-parallel LM head), is one run: the rows it holds are contiguous.
A slice along a later dimension (row-parallel weights: half of every row at tp 2) holds a sub-range of every
outer row. Two ways to read it:

- *whole*: one run over the whole tensor, cut after the read (``cut`` runs); it reads the other ranks' columns;
- *rows*: one run per outer row, skipping the gaps; it reads only this rank's bytes but makes one read per row.

The rule is the same one that merges neighbouring runs: a gap is skipped only when it is at least
``skip_gap_bytes`` (``SKIP_GAP_BYTES``, 1 MiB); anything smaller is read through. Why 1 MiB: a buffered read
makes the kernel read ahead ``read_ahead_kb`` (128 KiB by default, up to twice that once a stream is
sequential) past every request, so gaps below that cost the disk nothing to skip or not, and each extra read
costs a system call plus a queue round trip (about 0.1 ms on NVMe: 100-200 KB at the 1-2 GB/s these disks
read); 1 MiB is four times either. Measured (benchmarks/load_device.py's docstring and its ``row_rule`` rows):
a Mixtral w2 [4096, 14336] bf16 at tp 2 read row by row (4096 reads of 14 KiB) made the disk read 110 of its
117 MB anyway and took longer than reading it whole and cutting it. So in practice every row-parallel slice is
read whole: a tp-2 rank of Mixtral reads 2/3 of each layer's experts (w1, w3: half; w2: all), of a Llama-2-70B
layer 0.68. Column-parallel slices cost exactly their bytes.

Chunks then cover each file in file order (one read per merged range, large ranges cut at ``buffer_bytes``),
never splitting a ``cut`` run inside an outer row, and pack small ranges of the same file into one buffer.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from hpi.executor.safetensors_header import TensorEntry
from hpi.executor.tp import Slice

__all__ = ["Chunk", "Piece", "Run", "SKIP_GAP_BYTES", "Segment", "plan_chunks", "runs_of"]

SKIP_GAP_BYTES = 2**20
PAGE = 4096  # O_DIRECT's alignment (offset, length and buffer address) and the staging layout's


@dataclass(frozen=True)
class Run:
    """File bytes ``[start_byte, stop_byte)`` for target ``target``. ``cut``: whole outer rows of the stored
    tensor (``granule_bytes`` each) to be cut along the slice's dim after the read; otherwise the target's own
    elements from ``dst_elem`` on, in order."""

    target: int
    start_byte: int
    stop_byte: int
    granule_bytes: int
    cut: bool
    dst_elem: int = 0


@dataclass(frozen=True)
class Segment:
    """One read: file bytes ``[read_start, read_stop)`` into the staging buffer at ``buf_offset``; the data it is
    for ends at ``data_stop`` (``read_stop`` rounded out past it for O_DIRECT may lie past the end of the file)."""

    read_start: int
    read_stop: int
    buf_offset: int
    data_stop: int

    @property
    def nbytes(self) -> int:
        return self.read_stop - self.read_start


@dataclass(frozen=True)
class Piece:
    """The part ``[start_byte, stop_byte)`` of ``run`` that a chunk holds, at ``buf_index`` in its buffer."""

    run: Run
    start_byte: int
    stop_byte: int
    buf_index: int


@dataclass(frozen=True)
class Chunk:
    file: str
    segments: tuple[Segment, ...]
    pieces: tuple[Piece, ...]

    @property
    def used_bytes(self) -> int:
        return max(s.buf_offset + s.nbytes for s in self.segments)

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def runs_of(target: int, entry: TensorEntry, part: Slice | None, skip_gap_bytes: int = SKIP_GAP_BYTES) -> list[Run]:
    """The runs that read ``entry`` (or its slice ``part``) for target ``target``; see the module's rule."""
    item = entry.itemsize_bytes
    if part is None:
        return [Run(target, entry.start_byte, entry.stop_byte, item, cut=False)]
    block = entry.block_bytes(part.dim)  # bytes of one index along the slice's dim
    n, outer, size = part.stop - part.start, math.prod(entry.shape[:part.dim]), entry.shape[part.dim]
    if outer == 1:
        start = entry.start_byte + part.start * block
        return [Run(target, start, start + n * block, item, cut=False)] if n else []
    row = size * block  # one outer row of the stored tensor
    if (size - n) * block < skip_gap_bytes:
        return [Run(target, entry.start_byte, entry.stop_byte, row, cut=True)]
    inner, first = block // item, entry.start_byte + part.start * block
    return [Run(target, first + o * row, first + o * row + n * block, item, cut=False, dst_elem=o * part.padded * inner)
            for o in range(outer)]


def _spans(runs: list[Run], skip_gap_bytes: int) -> list[tuple[int, int, list[Run]]]:
    """Runs sorted by start, merged while the gap to the next is below ``skip_gap_bytes`` (overlaps merge)."""
    spans: list[tuple[int, int, list[Run]]] = []
    for run in sorted(runs, key=lambda r: (r.start_byte, r.stop_byte)):
        if spans and run.start_byte - spans[-1][1] < skip_gap_bytes:
            start, stop, members = spans[-1]
            members.append(run)
            spans[-1] = (start, max(stop, run.stop_byte), members)
        else:
            spans.append((run.start_byte, run.stop_byte, [run]))
    return spans


def _cut_point(pos: int, limit: int, runs: list[Run]) -> int:
    """The largest offset in ``(pos, limit]`` that splits no run inside a granule (an element, or an outer row of
    a ``cut`` run)."""
    cut = limit
    moved = True
    while moved:
        moved = False
        for r in runs:
            if r.start_byte < cut < r.stop_byte:
                aligned = r.start_byte + (cut - r.start_byte) // r.granule_bytes * r.granule_bytes
                if aligned < cut:
                    cut, moved = aligned, True
    if cut <= pos:
        raise ValueError(f"cannot cut a chunk of at most {limit - pos} bytes at byte {pos}: a granule is larger "
                         "(raise chunk_bytes)")
    return cut


def buffer_bytes_for(runs: list[Run], chunk_bytes: int) -> int:
    """A staging buffer size: ``chunk_bytes`` (less when the runs are smaller), at least two of the largest granule,
    a power of two (what torch's pinned allocator hands out anyway)."""
    largest = max((r.granule_bytes for r in runs), default=1)
    need = max(min(chunk_bytes, sum(r.stop_byte - r.start_byte for r in runs) + 4 * PAGE), 2 * largest + 4 * PAGE)
    return 1 << (need - 1).bit_length()


def plan_chunks(file: str, runs: list[Run], buffer_bytes: int, skip_gap_bytes: int = SKIP_GAP_BYTES,
                align: int = 1) -> list[Chunk]:
    """Chunks of one file in file order, each fitting ``buffer_bytes``. ``align`` (1, or ``PAGE`` for O_DIRECT)
    rounds every read out to its multiple. In the buffer a file byte ``f`` lands at an index congruent to ``f``
    modulo ``PAGE``, so the staged bytes keep the file's element alignment and views need no copy."""
    chunks: list[Chunk] = []
    segments: list[tuple[int, int]] = []  # (start, stop) of the data, before rounding out
    members: list[list[Run]] = []
    used = 0

    def close() -> None:
        nonlocal used
        if segments:
            chunks.append(_chunk(file, segments, members, align))
        segments.clear()
        members.clear()
        used = 0

    for start, stop, span_runs in _spans(runs, skip_gap_bytes):
        starts = [r.start_byte for r in span_runs]
        ends = list(itertools.accumulate((r.stop_byte for r in span_runs), max))  # runs before i end by ends[i]
        pos = start
        while pos < stop:
            room = buffer_bytes - (-(-used // PAGE) * PAGE) - 2 * PAGE
            first = bisect.bisect_right(ends, pos)  # every run before it ends at or before pos
            if stop - pos <= room:
                take = stop
            elif segments:
                close()
                continue
            else:
                take = _cut_point(pos, pos + room, span_runs[first:bisect.bisect_left(starts, pos + room)])
            inside = [r for r in span_runs[first:bisect.bisect_left(starts, take)] if r.stop_byte > pos]
            segments.append((pos, take))
            members.append(inside)
            used = -(-used // PAGE) * PAGE + PAGE + (take - pos) + PAGE
            pos = take
    close()
    return chunks


def _chunk(file: str, segments: list[tuple[int, int]], members: list[list[Run]], align: int) -> Chunk:
    out_segments, pieces, used = [], [], 0
    for (start, stop), runs in zip(segments, members):
        read_start, read_stop = start // align * align, -(-stop // align) * align
        buf_offset = -(-used // PAGE) * PAGE + read_start % PAGE
        out_segments.append(Segment(read_start, read_stop, buf_offset, stop))
        used = buf_offset + read_stop - read_start
        for r in runs:
            lo, hi = max(r.start_byte, start), min(r.stop_byte, stop)
            pieces.append(Piece(r, lo, hi, buf_offset + lo - read_start))
    return Chunk(file, tuple(out_segments), tuple(pieces))

"""The Emitter's disk spool: append-only segment files of length + CRC framed records.

Why this format: after a crash the last write may be torn (a partial frame, or a zero-filled
tail the filesystem allocated but never wrote). Every frame carries its payload length and a
CRC-32 of the payload, so a reader stops at the first frame that is incomplete or does not
match and never hands out a misread record. A fresh segment is started at every open, so a
torn tail is never appended to.

Layout: ``<dir>/<id:016d>.seg``; a segment is ``MAGIC`` followed by frames
``<u32 little-endian payload length><u32 crc32(payload)><payload>``. Segments are read whole,
in id order, and deleted only when the caller releases them (after every record was acked).
A segment whose valid prefix ends in a CRC mismatch (not a torn tail) is kept as
``<id>.seg.corrupt`` for inspection instead of being deleted.

Thread safe: appends may come from several threads while one thread reads and releases.
Reading a segment's file and fsync run outside the lock, so an append never waits for them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"SPNDSPL1"
FRAME = struct.Struct("<II")
MAX_PAYLOAD = 16 << 20
SUFFIX = ".seg"


def frame(payload: bytes) -> bytes:
    """One framed record. Empty payloads are refused: a zero-filled tail must never parse as data."""
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise ValueError(f"spool payload must be 1..{MAX_PAYLOAD} bytes, got {len(payload)}")
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class ParseResult:
    payloads: list[bytes]
    valid_bytes: int  # length of the prefix (magic included) that parsed cleanly
    problem: str | None  # why parsing stopped before the end, None if the whole buffer was valid
    corrupt: bool  # True for a CRC mismatch or bad header (data damage), False for a torn tail


def parse_segment(data: bytes) -> ParseResult:
    """Every record of a segment's bytes, up to the first torn or damaged frame."""
    if len(data) < len(MAGIC):
        return ParseResult([], 0, f"torn segment header ({len(data)} bytes)" if data else None, False)
    if data[: len(MAGIC)] != MAGIC:
        return ParseResult([], 0, f"not a spool segment (header {data[:8].hex()})", True)
    payloads: list[bytes] = []
    pos = len(MAGIC)
    end = len(data)
    header = FRAME.size
    unpack = FRAME.unpack_from
    crc32 = zlib.crc32
    while pos < end:
        if end - pos < header:
            return ParseResult(payloads, pos, f"torn frame header at byte {pos}", False)
        length, crc = unpack(data, pos)
        if length == 0:
            return ParseResult(payloads, pos, f"zero-filled tail at byte {pos}", False)
        if length > MAX_PAYLOAD:
            return ParseResult(payloads, pos, f"impossible frame length {length} at byte {pos}", True)
        start = pos + header
        if end - start < length:
            return ParseResult(payloads, pos, f"torn frame at byte {pos} ({end - start} of {length} bytes)", False)
        payload = data[start : start + length]
        if crc32(payload) != crc:
            return ParseResult(payloads, pos, f"CRC mismatch in frame at byte {pos}", True)
        payloads.append(payload)
        pos = start + length
    return ParseResult(payloads, pos, None, False)


@dataclass
class _Segment:
    id: int
    path: Path
    size: int
    records: int | None  # None until read (segments found at open are counted by reading them)
    corrupt: bool = False


class SpoolFull(Exception):
    """The spool reached its byte bound; the records that did not fit were not written."""


class Spool:
    """A bounded FIFO of byte records on disk."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 8 << 20) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # oldest first; the last may be the open tail
        self._tail_fd: int | None = None
        self._dirty = False
        self._read_pos = 0  # index into _segments of the next segment read_next() returns
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.stem.isdigit():
                self._segments.append(_Segment(int(path.stem), path, path.stat().st_size, None))
        for seg in self._segments:
            self._count(seg)
        self._next_id = (self._segments[-1].id + 1) if self._segments else 1

    def _count(self, seg: _Segment) -> None:
        result = parse_segment(seg.path.read_bytes())
        seg.records = len(result.payloads)
        seg.corrupt = result.corrupt

    # -- size ------------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes()

    def _bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    @property
    def records(self) -> int:
        """Records on disk not yet released (read-but-unreleased ones included)."""
        with self._lock:
            return sum(seg.records or 0 for seg in self._segments)

    def __len__(self) -> int:
        return self.records

    # -- writing ---------------------------------------------------------------------------
    def append(self, payloads: Sequence[bytes]) -> int:
        """Write records in order; return how many were written.

        Stops at the first record that would push the spool past ``max_bytes`` (the caller
        counts the rest as failed). Data reaches the OS at once; ``sync`` makes it durable.
        Raises OSError if the directory is not writable.
        """
        if not payloads:
            return 0
        with self._lock:
            return self._append(payloads)

    def _append(self, payloads: Sequence[bytes]) -> int:
        room = self.max_bytes - self._bytes()
        if self._tail_fd is None:
            room -= len(MAGIC)
        parts: list[bytes] = []
        written = 0
        for payload in payloads:
            framed = frame(payload)
            if len(framed) > room:
                break
            room -= len(framed)
            parts.append(framed)
            written += 1
        if not written:
            return 0
        tail = self._open_tail()
        blob = b"".join(parts)
        os.write(self._tail_fd, blob)  # type: ignore[arg-type]
        tail.size += len(blob)
        tail.records = (tail.records or 0) + written
        self._dirty = True
        if tail.size >= self.segment_bytes:
            self._seal()
        return written

    def _open_tail(self) -> _Segment:
        if self._tail_fd is not None:
            return self._segments[-1]
        seg_id = self._next_id
        path = self.directory / f"{seg_id:016d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._next_id += 1
        self._tail_fd = fd
        seg = _Segment(seg_id, path, len(MAGIC), 0)
        self._segments.append(seg)
        self._sync_dir()
        return seg

    def _seal(self) -> None:
        if self._tail_fd is not None:
            if self._dirty:
                os.fsync(self._tail_fd)
                self._dirty = False
            os.close(self._tail_fd)
            self._tail_fd = None

    def sync(self) -> None:
        """fsync what was appended since the last sync (called per batch, never per record)."""
        with self._lock:
            if not (self._dirty and self._tail_fd is not None):
                return
            fd = os.dup(self._tail_fd)  # a concurrent roll may close the tail while fsync runs
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------
    def read_next(self) -> tuple[int, list[bytes]] | None:
        """The next unread segment as ``(segment_id, payloads)``, oldest first; None if all were read.

        Reading the open tail seals it, so later appends go to a new segment and a segment's
        contents never change after it was handed out.
        """
        with self._lock:
            if self._read_pos >= len(self._segments):
                return None
            seg = self._segments[self._read_pos]
            if self._tail_fd is not None and seg is self._segments[-1]:
                self._seal()
        result = parse_segment(seg.path.read_bytes())
        if result.problem is not None:
            dropped = seg.size - result.valid_bytes
            level = logging.ERROR if result.corrupt else logging.WARNING
            log.log(level, "spool segment %s: %s; %d bytes after it are skipped", seg.path, result.problem, dropped)
        with self._lock:
            seg.records = len(result.payloads)
            seg.corrupt = result.corrupt
            self._read_pos += 1
        return seg.id, result.payloads

    def rewind(self) -> None:
        """Make read_next start again from the oldest unreleased segment (after a failed replay)."""
        with self._lock:
            self._read_pos = 0

    def release(self, segment_id: int) -> None:
        """Every record of this (already read) segment is safe elsewhere: delete it."""
        with self._lock:
            self._release(segment_id)

    def _release(self, segment_id: int) -> None:
        index = next((i for i, seg in enumerate(self._segments) if seg.id == segment_id), None)
        if index is None:
            return
        seg = self._segments[index]
        if index >= self._read_pos:
            raise ValueError(f"segment {segment_id} was not read yet")
        if seg.corrupt:
            seg.path.rename(seg.path.with_name(seg.path.name + ".corrupt"))
            log.error("spool segment %s had damaged records; kept as %s.corrupt", seg.path, seg.path.name)
        else:
            seg.path.unlink(missing_ok=True)
        del self._segments[index]
        self._read_pos -= 1

    def close(self) -> None:
        with self._lock:
            self._seal()

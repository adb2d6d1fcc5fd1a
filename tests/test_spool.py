"""The Emitter's disk spool: framing, crash tails, damage, bound, order (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendstream.edge.spool import MAGIC, Spool, frame, parse_segment


def _records(n: int, size: int = 40) -> list[bytes]:
    return [f"record-{i:06d}-".encode().ljust(size, b"x") for i in range(n)]


def _drain(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while (nxt := spool.read_next()) is not None:
        out.extend(nxt[1])
    return out


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_order_is_kept_across_segments_and_reopen(tmp_path: Path) -> None:
    records = _records(1000)
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    for start in range(0, 1000, 70):
        assert spool.append(records[start : start + 70]) == len(records[start : start + 70])
    spool.sync()
    spool.close()
    assert len(_segments(tmp_path)) > 5
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    assert reopened.records == 1000
    assert _drain(reopened) == records


def test_release_deletes_and_rewind_rereads_unreleased(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1024)
    for start in range(0, 100, 10):
        spool.append(_records(100)[start : start + 10])
    first = spool.read_next()
    second = spool.read_next()
    assert first is not None and second is not None
    spool.release(first[0])
    assert not (tmp_path / f"{first[0]:016d}.seg").exists()
    spool.rewind()
    again = spool.read_next()
    assert again == second
    assert spool.records == 100 - len(first[1])


def test_release_of_unread_segment_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(_records(3))
    spool.close()
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="not read yet"):
        reopened.release(1)


def test_appends_after_reading_the_tail_go_to_a_new_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(_records(5))
    seg_id, payloads = spool.read_next()  # type: ignore[misc]
    spool.append([b"later"])
    assert len(payloads) == 5
    assert spool.read_next() == (seg_id + 1, [b"later"])


def test_torn_tail_after_a_crash_is_dropped(tmp_path: Path) -> None:
    records = _records(10)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(records)
    spool.close()
    (seg,) = _segments(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # the last frame lost its end
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.records == 9
    assert _drain(reopened) == records[:9]
    reopened.append([b"new"])  # never appended to the torn segment
    assert seg.read_bytes() == data[:-7]


def test_zero_filled_tail_is_not_read_as_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(_records(4))
    spool.close()
    (seg,) = _segments(tmp_path)
    seg.write_bytes(seg.read_bytes() + b"\0" * 4096)
    assert _drain(Spool(tmp_path, max_bytes=1 << 20)) == _records(4)


def test_crc_mismatch_is_detected_and_the_segment_kept_aside(tmp_path: Path) -> None:
    records = _records(10)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(records)
    spool.close()
    (seg,) = _segments(tmp_path)
    data = bytearray(seg.read_bytes())
    frame_len = len(frame(records[0]))
    data[len(MAGIC) + 3 * frame_len + 12] ^= 0x01  # a payload byte of the fourth record
    seg.write_bytes(bytes(data))
    result = parse_segment(bytes(data))
    assert result.corrupt and "CRC mismatch" in (result.problem or "")
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    seg_id, payloads = reopened.read_next()  # type: ignore[misc]
    assert payloads == records[:3]
    reopened.release(seg_id)
    assert not seg.exists()
    assert seg.with_name(seg.name + ".corrupt").exists()


def test_foreign_file_is_not_parsed() -> None:
    result = parse_segment(b"definitely not a spool segment")
    assert result.payloads == [] and result.corrupt


def test_byte_bound_is_respected(tmp_path: Path) -> None:
    bound = 1 << 16
    spool = Spool(tmp_path, max_bytes=bound, segment_bytes=8192)
    records = _records(5000, size=100)
    written = spool.append(records)
    assert 0 < written < 5000
    assert spool.bytes <= bound
    assert spool.append(records[written:]) == 0
    assert sum(p.stat().st_size for p in _segments(tmp_path)) <= bound
    assert _drain(spool) == records[:written]


def test_unwritable_directory_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        Spool(blocker / "spool", max_bytes=1 << 20)


def test_empty_payload_is_refused() -> None:
    with pytest.raises(ValueError):
        frame(b"")


@given(st.lists(st.binary(min_size=1, max_size=64), max_size=30), st.data())
def test_any_truncation_yields_a_prefix_of_the_records(payloads: list[bytes], data: st.DataObject) -> None:
    blob = MAGIC + b"".join(frame(p) for p in payloads)
    assert parse_segment(blob).payloads == payloads
    cut = data.draw(st.integers(0, len(blob)))
    result = parse_segment(blob[:cut])
    assert result.payloads == payloads[: len(result.payloads)]
    assert not result.corrupt


@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=30), st.data())
def test_a_flipped_byte_never_yields_a_wrong_record(payloads: list[bytes], data: st.DataObject) -> None:
    blob = bytearray(MAGIC + b"".join(frame(p) for p in payloads))
    pos = data.draw(st.integers(len(MAGIC), len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    result = parse_segment(bytes(blob))
    assert result.payloads == payloads[: len(result.payloads)]
    assert len(result.payloads) < len(payloads)

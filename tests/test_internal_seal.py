"""The seal on the processor's internal messages: only a holder of the signing key makes one that verifies."""

from __future__ import annotations

from pathlib import Path

from spendstream.core.record_signature import RecordSigner, write_key_pair
from spendstream.processor.internal_seal import SEAL_HEADER, InternalSeal, seal_headers


def test_a_seal_vouches_for_its_partition_and_value_only(tmp_path: Path) -> None:
    seal = InternalSeal(RecordSigner.from_file(write_key_pair(tmp_path / "a")[0]))
    other = InternalSeal(RecordSigner.from_file(write_key_pair(tmp_path / "b")[0]))
    value = b'{"p":0,"at":1,"w":1,"s":{}}'
    headers = seal.headers(3, value)
    assert seal.vouches_for(3, value, headers)
    assert seal.vouches_for(3, value, dict(headers))  # faust may hand headers over as a mapping
    assert not seal.vouches_for(2, value, headers)  # replayed on another partition
    assert not seal.vouches_for(3, value + b" ", headers)
    assert not seal.vouches_for(3, value, [])
    assert not seal.vouches_for(3, value, None)
    assert not seal.vouches_for(3, None, headers)
    assert not seal.vouches_for(3, value, [(SEAL_HEADER, "text")])
    assert not other.vouches_for(3, value, headers)  # another key pair's processor
    assert seal_headers(None, 3, value) is None and seal_headers(seal, 3, value) == headers

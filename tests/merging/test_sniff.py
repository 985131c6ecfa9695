"""A safetensors file whose header length starts like a pickle's protocol bytes is still safetensors."""

from __future__ import annotations

import struct

import pytest

from app.merging import safetensors_io as stio
from app.merging.errors import NotSafetensors


@pytest.mark.parametrize("length", [0x280, 0x380, 0x480, 0x580])
def test_a_header_length_that_looks_like_pickle_protocol_bytes_is_accepted(length: int) -> None:
    first = struct.pack("<Q", length) + b"{"
    assert first[:2] in {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}
    stio.sniff_format(first)  # no error


def test_a_real_pickle_is_still_refused() -> None:
    with pytest.raises(NotSafetensors, match="pickle"):
        stio.sniff_format(b"\x80\x02}q\x00(X\x05\x00")

"""The one NaN/Inf check: for a whole tensor, and for a safetensors body streaming past in blocks.

The engine (an expert before or while it is folded), ``safetensors_io.check_finite``, the
in-memory fold and the upload path (``app.services.uploads``) all refuse a non-finite value
through :func:`check_finite_tensor`, so they agree on what is refused and on the sentence.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from app.merging.errors import NonFiniteTensor

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# FiniteScan views received (read-only) bytes as tensors and never writes through them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def check_finite_tensor(values: torch.Tensor, name: str, *, what: str = "tensor", part: str = "") -> None:
    """Raise NonFiniteTensor naming ``name`` when ``values`` holds a NaN or an Inf.

    ``what`` starts the sentence ("the expert's tensor"); ``part`` says where the count comes
    from when only part of the tensor was seen (" in one block").
    """
    if values.dtype in _FLOAT8:
        values = values.float()
    if not values.is_floating_point() or values.numel() == 0:
        return
    # min and max propagate NaN and are ±Inf if any value is: exact, and ~10x faster than
    # isfinite().all(), which materializes a mask. Count only on failure.
    low, high = torch.aminmax(values.reshape(-1))
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    finite = torch.isfinite(values)
    bad = int(finite.numel() - finite.sum())
    nans = int(torch.isnan(values).sum())
    raise NonFiniteTensor(
        f"{what} {name!r} has {bad} non-finite value(s){part} ({nans} NaN, {bad - nans} Inf)", tensor=name
    )


class FiniteScan:
    """Checks every floating tensor of a safetensors body for NaN/Inf as its bytes stream past.

    Bounded memory and no second read of the file: each block is viewed in place as tensor
    elements (an element split across two blocks is carried over, at most 7 bytes).
    ``header`` is a ``safetensors_io.Header``; ``data_start`` the byte where its data begins.
    """

    def __init__(self, header: Any, data_start: int) -> None:
        from app.merging import safetensors_io as stio

        self.ranges = sorted(
            (data_start + spec.begin, data_start + spec.end, name, *stio.DTYPES[spec.dtype])
            for name, spec in header.tensors.items()
            if spec.dtype in stio.FLOATING_DTYPES and spec.end > spec.begin
        )
        self.index = 0
        self.carry = b""

    def feed(self, pos: int, block: bytearray | bytes) -> None:
        """Scan ``block``, which holds bytes ``[pos, pos + len(block))`` of the file."""
        end = pos + len(block)
        view = memoryview(block)
        while self.index < len(self.ranges):
            begin, stop, name, dtype, size = self.ranges[self.index]
            if begin >= end:
                return
            lo, hi = max(begin, pos), min(stop, end)
            segment = view[lo - pos : hi - pos]
            if self.carry:  # complete the element split across the previous block's end
                need = size - len(self.carry)
                if len(segment) < need:
                    self.carry += bytes(segment)
                    return
                self._check(bytearray(self.carry) + segment[:need], dtype, name)
                segment = segment[need:]
                self.carry = b""
            aligned = len(segment) - len(segment) % size
            if aligned:
                self._check(segment[:aligned], dtype, name)
            self.carry = bytes(segment[aligned:])
            if stop > end:
                return
            self.index += 1
            self.carry = b""

    @staticmethod
    def _check(data: Any, dtype: torch.dtype, name: str) -> None:
        check_finite_tensor(torch.frombuffer(data, dtype=dtype), name, part=" in one block")

"""The streaming NaN/Inf check sees every element whatever the block boundaries."""

from __future__ import annotations

import random
import struct

import pytest
import torch
from safetensors.torch import save

from app.merging import safetensors_io as stio
from app.services.uploads import FiniteScan


@pytest.mark.parametrize("seed", range(4))
def test_finite_scan_finds_the_bad_tensor_across_any_block_split(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        tensors = {
            "a": torch.randn(37),
            "b": torch.randn(5, 3).half(),
            "c": torch.arange(7),
            "d": torch.randn(11).double(),
            "e": torch.randn(13).bfloat16(),
        }
        bad = rng.choice([None, "a", "b", "d", "e"])
        if bad:
            tensors[bad].view(-1)[rng.randrange(tensors[bad].numel())] = rng.choice([float("nan"), float("inf")])
        raw = save(tensors)
        n = struct.unpack("<Q", raw[:8])[0]
        scan = FiniteScan(stio.parse_header(raw[8 : 8 + n]), 8 + n)
        found = None
        pos = 0
        try:
            while pos < len(raw):
                step = rng.randint(1, 40)
                scan.feed(pos, bytearray(raw[pos : pos + step]))
                pos += step
        except stio.NonFiniteTensor as exc:
            found = exc.tensor
        assert found == bad

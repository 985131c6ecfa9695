"""A corpus of hostile checkpoint uploads, each built from one valid tiny checkpoint.

Every case is a named, described byte string plus what the API must answer for it when it
arrives as a stream's base and as an expert: the status, the error code, and words the
message must contain so that a person can tell what was wrong. ``build`` gets the valid
upload for that target (the base file for ``base``, an expert of it for ``expert``).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from tests.checkpoints import SHAPES

Expect = tuple[int, str, str]  # (status, error code, regex the message must match, case-insensitive)


@dataclass(frozen=True)
class Valid:
    """A valid upload, split into its regions."""

    raw: bytes

    @property
    def header_len(self) -> int:
        return struct.unpack("<Q", self.raw[:8])[0]

    @property
    def header(self) -> dict:
        return json.loads(self.raw[8 : 8 + self.header_len])

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data(self) -> bytes:
        return self.raw[self.data_start :]


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[Valid], bytes]
    base: Expect | None  # None: the case makes no sense for that target
    expert: Expect | None

    def expect(self, target: str) -> Expect | None:
        return self.base if target == "base" else self.expert


def encode(header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else json.dumps(header)).encode()
    )
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def mutate(change: Callable[[dict], object]) -> Callable[[Valid], bytes]:
    """A case that edits the valid file's header (same tensor names) and keeps its data section."""

    def build(valid: Valid) -> bytes:
        header = valid.header
        change(header)
        return encode(header, valid.data)

    return build


def ordered(header: dict) -> list[str]:
    """Tensor names by data offset."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def first(header: dict) -> dict:
    return header[ordered(header)[0]]


def last(header: dict) -> dict:
    return header[ordered(header)[-1]]


def _overlap(h: dict) -> None:
    a, b = ordered(h)[:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]


def _gap(h: dict) -> None:
    spec = last(h)
    spec["data_offsets"] = [spec["data_offsets"][0] + 4, spec["data_offsets"][1] + 4]


def _out_of_range(h: dict) -> None:
    spec = last(h)
    begin = spec["data_offsets"][0]
    spec["shape"] = [1 << 20]
    spec["data_offsets"] = [begin, begin + 4 * (1 << 20)]


def _rename(new: str) -> Callable[[dict], None]:
    def change(h: dict) -> None:
        old = ordered(h)[0]
        h[new] = h.pop(old)

    return change


def _duplicate_key(valid: Valid) -> bytes:
    text = json.dumps(valid.header)
    name = ordered(valid.header)[0]
    entry = json.dumps(valid.header[name])
    # The same tensor named twice: json.loads would silently keep the second.
    return encode(text[:-1] + f", {json.dumps(name)}: {entry}" + "}", valid.data)


def _non_utf8(valid: Valid) -> bytes:
    text = json.dumps(valid.header).encode()
    name = ordered(valid.header)[0].encode()
    return encode(text.replace(name, b"\xff\xfe" + name, 1), valid.data)


def _nul_name(valid: Valid) -> bytes:
    h = valid.header
    old = ordered(h)[0]
    h[old[:3] + "\x00" + old[3:]] = h.pop(old)
    return encode(h, valid.data)


def _deep(opening: str, closing: str, levels: int = 10_000) -> Callable[[Valid], bytes]:
    def build(valid: Valid) -> bytes:
        return encode('{"a": ' + opening * levels + closing * levels + "}")

    return build


def _values(value: float) -> Callable[[Valid], bytes]:
    """A float32 tensor's first element overwritten with NaN/Inf; everything else intact."""

    def build(valid: Valid) -> bytes:
        h = valid.header
        name = next(n for n in ordered(h) if h[n]["dtype"] == "F32")
        begin = h[name]["data_offsets"][0] + 8  # the third element, to not be trivially first
        data = bytearray(valid.data)
        data[begin : begin + 4] = struct.pack("<f", value)
        return valid.raw[: valid.data_start] + bytes(data)

    return build


def _tensors(valid: Valid) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(valid.raw)


def _changed(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Valid], bytes]:
    def build(valid: Valid) -> bytes:
        tensors = _tensors(valid)
        change(tensors)
        return save(tensors)

    return build


def torch_save_zip(valid: Valid) -> bytes:
    """What ``torch.save`` writes by default: a zip archive holding a pickle."""
    buf = io.BytesIO()
    torch.save(_tensors(valid), buf)
    return buf.getvalue()


def torch_save_legacy(valid: Valid) -> bytes:
    """``torch.save`` in its legacy form: a bare pickle stream."""
    buf = io.BytesIO()
    torch.save(_tensors(valid), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class MarkerPayload:
    """Unpickling this creates ``path``: proof that something unpickled an upload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# Where the payload would create its marker: an absolute path, so that a server subprocess on
# this machine that unpickled it would create this very file.
MARKER_PATH = Path(tempfile.mkdtemp(prefix="mergeline-unpickle-")) / "UNPICKLED"


def reduce_payload(valid: Valid) -> bytes:
    return pickle.dumps({"state_dict": MarkerPayload(MARKER_PATH)}, protocol=4)


NOT_ST: Expect = (400, "not_safetensors", "")
TRUNC: Expect = (400, "truncated", r"declares \d+|ends")


def both(expect: Expect) -> dict:
    return {"base": expect, "expert": expect}


def case(
    name: str,
    description: str,
    build: Callable[[Valid], bytes],
    *,
    base: Expect | None,
    expert: Expect | None,
) -> Case:
    return Case(name, description, build, base, expert)


def c2(name: str, description: str, build: Callable[[Valid], bytes], expect: Expect) -> Case:
    return Case(name, description, build, expect, expect)


CASES: list[Case] = [
    # -- the body as a whole
    c2("zero-byte body", "an empty request body", lambda v: b"", (400, "not_safetensors", "empty")),
    c2(
        "inside the length prefix",
        "cut inside the 8-byte header length",
        lambda v: v.raw[:5],
        (400, "not_safetensors", "too short|8-byte"),
    ),
    c2(
        "inside the header JSON",
        "cut half-way through the JSON header",
        lambda v: v.raw[: 8 + v.header_len // 2],
        (400, "truncated", r"inside the \d+-byte safetensors header"),
    ),
    c2("at the data start", "the header whole, then nothing", lambda v: v.raw[: v.data_start], TRUNC),
    c2(
        "mid-tensor",
        "cut in the middle of the data section",
        lambda v: v.raw[: v.data_start + len(v.data) // 2 + 3],
        TRUNC,
    ),
    c2("one byte short", "every byte but the last", lambda v: v.raw[:-1], TRUNC),
    c2(
        "trailing garbage",
        "the valid file plus bytes after its data",
        lambda v: v.raw + b"\x00GARBAGE",
        (400, "trailing_data", "longer than|declares"),
    ),
    # -- the header length lies
    c2(
        "header length past the body",
        "declares a header longer than the whole upload",
        lambda v: encode(v.raw[8:], length=len(v.raw) + 100),
        (400, "truncated", "header"),
    ),
    c2(
        "header length too small",
        "declares 10 bytes less than the JSON header",
        lambda v: encode(v.raw[8:], length=v.header_len - 10),
        (400, "not_safetensors", "JSON"),
    ),
    c2(
        "header length zero",
        "declares a 0-byte header",
        lambda v: encode(v.raw[8:], length=0),
        (400, "not_safetensors", "header length is 0"),
    ),
    c2(
        "header length 2^63",
        "declares a 2^63-byte header",
        lambda v: encode(v.raw[8:], length=1 << 63),
        (413, "header_too_large", "limit"),
    ),
    c2(
        "header length 2^64-1",
        "declares the largest u64",
        lambda v: encode(v.raw[8:], length=(1 << 64) - 1),
        (413, "header_too_large", "limit"),
    ),
    # -- the header is not a safetensors header
    c2(
        "header JSON invalid",
        "not JSON at all",
        lambda v: encode(b"{not json!!}", v.data),
        (400, "not_safetensors", "JSON"),
    ),
    c2(
        "header is an array",
        "a JSON array, not an object",
        lambda v: encode(b"[1, 2, 3]", v.data),
        (400, "not_safetensors", "object"),
    ),
    c2(
        "header is a string",
        "a JSON string",
        lambda v: encode(b'"hello"'),
        (400, "not_safetensors", "object"),
    ),
    c2(
        "header nested 10k arrays",
        "an object holding 10,000 nested arrays",
        _deep("[", "]"),
        (400, "not_safetensors", "nest"),
    ),
    c2(
        "header nested 10k objects",
        "10,000 nested objects",
        _deep('{"a":', "}"),
        (400, "not_safetensors", "nest"),
    ),
    c2(
        "header padded with NUL",
        "header JSON followed by NUL bytes inside the declared length",
        lambda v: encode(json.dumps(v.header).encode() + b"\x00" * 8, v.data),
        (400, "not_safetensors", "JSON"),
    ),
    c2(
        "non-UTF-8 header",
        "a tensor name with bytes that are not UTF-8",
        _non_utf8,
        (400, "not_safetensors", "UTF-8"),
    ),
    c2(
        "duplicate keys",
        "one tensor named twice in the header",
        _duplicate_key,
        (400, "not_safetensors", "twice"),
    ),
    c2(
        "empty header",
        "a header with no tensors at all",
        lambda v: encode(b"{}"),
        (400, "no_tensors", "no tensors"),
    ),
    c2(
        "metadata not str->str",
        "__metadata__ maps a key to a number",
        mutate(lambda h: h.update(__metadata__={"epochs": 3})),
        (400, "not_safetensors", "__metadata__"),
    ),
    c2(
        "metadata a list",
        "__metadata__ is a list",
        mutate(lambda h: h.update(__metadata__=["a"])),
        (400, "not_safetensors", "__metadata__"),
    ),
    c2(
        "entry not an object",
        "a tensor entry that is a list",
        mutate(lambda h: h.update({ordered(h)[0]: [1, 2]})),
        (400, "not_safetensors", "dtype, shape and data_offsets"),
    ),
    c2(
        "entry with extra field",
        "a tensor entry with an unknown field",
        mutate(lambda h: first(h).update(pickle="cos\nsystem\n")),
        (400, "not_safetensors", "dtype, shape and data_offsets"),
    ),
    # -- offsets
    c2(
        "offsets overlapping",
        "two tensors share one byte range",
        mutate(_overlap),
        (400, "not_safetensors", "overlap"),
    ),
    c2(
        "offsets with a gap",
        "the last tensor starts 4 bytes after the one before ends",
        mutate(_gap),
        (400, "not_safetensors", "gap"),
    ),
    c2(
        "offsets reversed",
        "end before begin",
        mutate(lambda h: first(h).update(data_offsets=first(h)["data_offsets"][::-1])),
        (400, "not_safetensors", "data_offsets"),
    ),
    c2(
        "offsets negative",
        "a negative begin",
        mutate(lambda h: first(h).update(data_offsets=[-4, first(h)["data_offsets"][1]])),
        (400, "not_safetensors", "non-negative"),
    ),
    c2(
        "offsets not integers",
        "floats where integers belong",
        mutate(lambda h: first(h).update(data_offsets=[float(x) for x in first(h)["data_offsets"]])),
        (400, "not_safetensors", "integers"),
    ),
    c2(
        "offsets strings",
        "strings where integers belong",
        mutate(lambda h: first(h).update(data_offsets=[str(x) for x in first(h)["data_offsets"]])),
        (400, "not_safetensors", "integers"),
    ),
    c2(
        "offsets three numbers",
        "data_offsets with three entries",
        mutate(lambda h: first(h).update(data_offsets=[*first(h)["data_offsets"], 0])),
        (400, "not_safetensors", "two"),
    ),
    c2(
        "offsets not dtype x shape",
        "a byte range 4 bytes shorter than dtype size x element count",
        mutate(
            lambda h: first(h).update(
                data_offsets=[first(h)["data_offsets"][0], first(h)["data_offsets"][1] - 4]
            )
        ),
        (400, "not_safetensors", "needs"),
    ),
    case(
        "offsets out of range",
        "the last tensor's bytes run 4 MiB past the end of the upload",
        mutate(_out_of_range),
        base=TRUNC,
        expert=(422, "shape_mismatch", "shape"),
    ),
    # -- dtypes and shapes
    c2(
        "unknown dtype",
        "dtype F128",
        mutate(lambda h: first(h).update(dtype="F128")),
        (400, "not_safetensors", "unknown dtype"),
    ),
    c2(
        "dtype not a string",
        "dtype is a number",
        mutate(lambda h: first(h).update(dtype=4)),
        (400, "not_safetensors", "dtype"),
    ),
    c2(
        "shape negative",
        "a dimension of -1",
        mutate(lambda h: first(h).update(shape=[-1, 4])),
        (400, "not_safetensors", "shape"),
    ),
    c2(
        "shape not integers",
        "a dimension of 2.5",
        mutate(lambda h: first(h).update(shape=[2.5])),
        (400, "not_safetensors", "shape"),
    ),
    case(
        "shape overflow",
        "2^40 x 2^40 elements with matching 2^82-byte offsets",
        mutate(
            lambda h: last(h).update(
                shape=[1 << 40, 1 << 40],
                data_offsets=[last(h)["data_offsets"][0], last(h)["data_offsets"][0] + (4 << 80)],
            )
        ),
        base=(413, "upload_too_large", "accepts at most"),
        expert=(422, "shape_mismatch", "1099511627776"),
    ),
    c2(
        "shape of 5000 digits",
        "a dimension too long to be a number",
        lambda v: encode(json.dumps(v.header).replace("[", "[" + "9" * 5000 + ", ", 1), v.data),
        (400, "not_safetensors", "JSON"),
    ),
    c2(
        "huge shape array",
        "a shape list of 15,000 ones (rank 15,000)",
        mutate(lambda h: first(h).update(shape=[1] * 15000)),
        (400, "not_safetensors", "at most 16"),
    ),
    case(
        "float8 base",
        "a float8 tensor: folds cannot compute on it",
        _changed(lambda t: t.update({"norm.weight": t["norm.weight"].to(torch.float8_e4m3fn)})),
        base=(422, "unsupported_dtype", "F8_E4M3"),
        expert=(422, "unsupported_dtype", "F8_E4M3"),
    ),
    # -- names
    c2(
        "name with path separators",
        "a tensor named ../../etc/passwd",
        mutate(_rename("../../etc/passwd")),
        (400, "invalid_tensor_name", "path separator"),
    ),
    c2(
        "name with backslashes",
        r"a tensor named ..\..\boot.ini",
        mutate(_rename("..\\..\\boot.ini")),
        (400, "invalid_tensor_name", "path separator"),
    ),
    c2("name is ..", "a tensor named ..", mutate(_rename("..")), (400, "invalid_tensor_name", r"\.\.")),
    c2(
        "name with NUL",
        "a tensor name with a NUL byte",
        _nul_name,
        (400, "not_safetensors", "control character"),
    ),
    c2(
        "name empty",
        "a tensor with an empty name",
        mutate(_rename("")),
        (400, "not_safetensors", "empty name"),
    ),
    c2(
        "name 2000 characters",
        "a tensor name 2000 characters long",
        mutate(_rename("w" * 2000)),
        (400, "not_safetensors", "characters long"),
    ),
    # -- against the base (expert only)
    case(
        "missing key",
        "the expert lacks one of the base's tensors",
        _changed(lambda t: t.pop("layer1.weight")),
        base=None,
        expert=(422, "key_mismatch", "layer1.weight"),
    ),
    case(
        "extra key",
        "the expert has a tensor the base lacks",
        _changed(lambda t: t.update(extra=torch.zeros(2))),
        base=None,
        expert=(422, "key_mismatch", "extra"),
    ),
    case(
        "wrong shape",
        "one tensor has a different shape",
        _changed(lambda t: t.update({"layer0.bias": torch.zeros(17)})),
        base=None,
        expert=(422, "shape_mismatch", "layer0.bias"),
    ),
    case(
        "wrong dtype",
        "one tensor is F16 instead of F32",
        _changed(lambda t: t.update({"layer0.weight": t["layer0.weight"].half()})),
        base=None,
        expert=(422, "dtype_mismatch", "layer0.weight"),
    ),
    # -- values
    c2("NaN", "a NaN inside a float32 tensor", _values(float("nan")), (422, "non_finite", "NaN")),
    c2("+Inf", "an Inf inside a float32 tensor", _values(float("inf")), (422, "non_finite", "Inf")),
    c2("-Inf", "a -Inf inside a float32 tensor", _values(float("-inf")), (422, "non_finite", "Inf")),
    # -- pickles: never unpickled, recognised and refused
    c2(
        "torch.save zip",
        "a real torch.save() checkpoint (zip + pickle)",
        torch_save_zip,
        (400, "not_safetensors", "pickle|torch.save"),
    ),
    c2(
        "torch.save legacy",
        "a real legacy torch.save() checkpoint (bare pickle)",
        torch_save_legacy,
        (400, "not_safetensors", "pickle|torch.save"),
    ),
    c2(
        "pickle __reduce__ payload",
        "a pickle whose __reduce__ would create a marker file",
        reduce_payload,
        (400, "not_safetensors", "pickle|torch.save"),
    ),
]

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
assert set(SHAPES)  # the valid checkpoint these cases are built from: tests.checkpoints

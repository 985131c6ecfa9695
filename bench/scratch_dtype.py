"""Would OPCM's pass-1 scratch in the output dtype (bfloat16 for a bf16 model) write the same bytes?

Folds OPCM version 2 of a generated bf16 Llama-shaped model (bench/fold.py's ``llama-tiny`` by
default) twice: as the engine does (the updates D kept in float32), and with every update rounded
to bfloat16 on its way into the scratch file, as a bf16 scratch would store it. Reports whether the
two outputs are byte-identical, how many output elements differ and by how many bf16 ulps, and the
scratch bytes a bf16 scratch would save. (For fp32 models the scratch is already in the output dtype.)

    python bench/scratch_dtype.py [--model llama-2l]

Writes bench/results/scratch_dtype.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fold as fold_bench  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from app.merging import engine, fold_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-tiny", choices=[m for m in fold_bench.MODELS if "llama" in m])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scratch_dtype.json")
    args = parser.parse_args()
    paths = fold_bench.generate(args.model, 0)
    meta = json.loads(paths["meta"].read_text())
    state = {"method": "opcm", "version": 1, "expert_norms": [meta["expert1_norm"]], "lambda": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        def fold(out: Path):
            return fold_checkpoint("opcm", {"alpha": 0.5}, paths["base"], paths["e1"], paths["e2"], state, out, 2,
                                   device="cpu", lineage={"parent_sha256": "-", "expert_sha256": "-"})

        as_is = fold(Path(tmp) / "f32.safetensors")
        put = engine._ScratchFile.put
        engine._ScratchFile.put = lambda self, name, t: put(self, name, t.to(torch.bfloat16).to(torch.float32))
        try:
            rounded = fold(Path(tmp) / "bf16.safetensors")
        finally:
            engine._ScratchFile.put = put
        x, y = load_file(str(as_is.out)), load_file(str(rounded.out))
    elements = changed = 0
    worst = 0.0
    for name, a in x.items():
        if not a.is_floating_point():
            continue
        a, b = a.float(), y[name].float()
        diff = (a - b).abs()
        elements += diff.numel()
        changed += int((diff > 0).sum())
        larger = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)
        ulp = torch.exp2(torch.floor(torch.log2(larger)) - 7)  # bf16: 8 significant bits
        worst = max(worst, float((diff / ulp).max()))
    report = {
        "model": args.model, "dtype": "bfloat16", "params": meta["params"],
        "same_sha256": as_is.sha256 == rounded.sha256,
        "output_elements": elements, "output_elements_changed": changed, "fraction_changed": changed / elements,
        "max_change_in_output_bf16_ulps": worst,
        "scratch_bytes_float32": 4 * meta["params"], "scratch_bytes_bfloat16": 2 * meta["params"],
        "command": " ".join(["python", "bench/scratch_dtype.py", *sys.argv[1:]]),
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Offline folds from the command line: ``merge`` a list of experts, or ``fold`` one step.

Run as ``python -m app.merging.cli ...``; the service's ``mergeline`` command mounts the same
commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.merging.engine import FoldResult, fold_checkpoint
from app.merging.errors import CheckpointError
from app.merging.folders import checkpoint_sha256
from app.merging.registry import METHODS, validate_params

app = typer.Typer(help="Fold fine-tuned experts into a merged model, offline.", no_args_is_help=True)
console = Console(stderr=True)

MethodOption = Annotated[str, typer.Option("--method", help=f"merge method: {', '.join(METHODS)}")]
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", help="a method parameter as name=value (repeatable), e.g. alpha=0.5"),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda")]


def _parse_params(method: str, items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise CheckpointError(f"--param takes name=value, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare string, e.g. a regex
        params[name.strip()] = value
    return validate_params(method, params)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _state_file(result: FoldResult, params: dict[str, Any]) -> dict[str, Any]:
    # The fold state first (what the next fold needs), then what a person wants to see.
    return {**result.state, "params": params, "sha256": result.sha256, "size": result.size, "metrics": result.metrics}


def _fold_with_progress(progress: Progress, label: str, **kwargs: Any) -> FoldResult:
    task = progress.add_task(label, total=1.0)
    result = fold_checkpoint(progress=lambda f: progress.update(task, completed=f), **kwargs)
    progress.update(task, completed=1.0)
    return result


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def _fail(exc: CheckpointError) -> typer.Exit:
    console.print(f"[red]error[/red] ({exc.code}): {exc}")
    return typer.Exit(code=2)


def _summary(version: int, result: FoldResult) -> str:
    m = result.metrics
    return (
        f"version {version}: {result.out}  λ={m['lambda']:.4f}  ‖merged τ‖={m['merged_task_norm']:.4g}  "
        f"removed={m['removed_fraction']:.3f}  cos(prev)={m['cosine_previous']:.3f}  {m['seconds']:.1f}s"
    )


@app.command()
def merge(
    experts: Annotated[
        list[Path], typer.Argument(help="expert checkpoints in arrival order: files, model folders or LoRA adapter folders")
    ],
    base: Annotated[Path, typer.Option("--base", help="the base checkpoint (.safetensors file or model folder)")],
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="writes 1.safetensors, … (1/, 2/, … for a folder base) and state.json")
    ],
    method: MethodOption = "opcm",
    param: ParamOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Fold every expert in turn, writing each version and the final fold state."""
    try:
        params = _parse_params(method, param)
        out_dir.mkdir(parents=True, exist_ok=True)
        sharded = base.is_dir()
        previous: Path | None = None
        state: dict[str, Any] | None = None
        parent_sha: str | None = None
        lineage_experts: list[dict[str, str]] = []
        with _progress() as progress:
            for version, expert in enumerate(experts, start=1):
                out = out_dir / (str(version) if sharded else f"{version}.safetensors")
                lineage_experts.append({"name": expert.name, "sha256": checkpoint_sha256(expert)})
                lineage: dict[str, Any] = {"parent_sha256": parent_sha} if parent_sha else {}
                lineage.update(experts=list(lineage_experts), base_model=base.name)
                result = _fold_with_progress(
                    progress, f"version {version} ← {expert.name}", method=method, params=params, base=base,
                    previous=previous, expert=expert, state=state, out=out, version=version, device=device,
                    lineage=lineage,
                )
                console.print(_summary(version, result))
                previous, state, parent_sha = result.out, result.state, result.sha256
                _write_json(out_dir / "state.json", _state_file(result, params))
    except CheckpointError as exc:
        raise _fail(exc) from None


@app.command()
def fold(
    base: Annotated[Path, typer.Option("--base", help="the base checkpoint")],
    expert: Annotated[Path, typer.Option("--expert", help="the expert to fold in (file, model folder or LoRA adapter)")],
    state: Annotated[Path, typer.Option("--state", help="fold state JSON: read (unless first expert), then rewritten")],
    out: Annotated[Path, typer.Option("--out", help="where to write the new version (a folder for a folder base)")],
    previous: Annotated[
        Path | None, typer.Option("--previous", help="the previous version; omit for the first expert")
    ] = None,
    method: MethodOption = "opcm",
    param: ParamOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Fold one expert into the previous version (or into the base, for the first expert)."""
    try:
        params = _parse_params(method, param)
        carried: dict[str, Any] | None = None
        version = 1
        if previous is not None:
            try:
                carried = json.loads(state.read_text())
            except FileNotFoundError:
                raise CheckpointError(f"{state} does not exist: --previous needs the state of the fold that made it") from None
            except ValueError as exc:
                raise CheckpointError(f"{state} is not valid JSON: {exc}") from None
            if not isinstance(carried, dict) or not isinstance(carried.get("version"), int):
                raise CheckpointError(f"{state} is not a fold state (no version number)")
            version = carried["version"] + 1
        with _progress() as progress:
            result = _fold_with_progress(
                progress, f"version {version} ← {expert.name}", method=method, params=params, base=base,
                previous=previous, expert=expert, state=carried, out=out, version=version, device=device,
            )
        console.print(_summary(version, result))
        _write_json(state, _state_file(result, params))
    except CheckpointError as exc:
        raise _fail(exc) from None


if __name__ == "__main__":
    app()

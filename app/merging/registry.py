"""The merge methods a stream can use, by name, and the validation of their parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from app.merging.errors import InvalidParams
from app.merging.methods.average import Average
from app.merging.methods.dop import DOP
from app.merging.methods.iso_c import IsoC
from app.merging.methods.magmax import MagMax
from app.merging.methods.opcm import OPCM
from app.merging.methods.task_arithmetic import TaskArithmetic
from app.merging.methods.ties import Ties
from app.merging.processing.base import PostprocessStep, PreprocessStep
from app.merging.processing.breadcrumbs import Breadcrumbs
from app.merging.processing.dare import Dare
from app.merging.processing.lines import LiNeS
from app.merging.processing.topk import TopK
from app.merging.protocol import MergeMethod

# One line per method: the key is the stream's ``method`` and the module's name.
METHODS: dict[str, type[MergeMethod]] = {
    "opcm": OPCM,
    "average": Average,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "magmax": MagMax,
    "dop": DOP,
    "iso_c": IsoC,
}

# Steps of params.preprocess (on each incoming task vector) and params.postprocess (on the merged one).
PREPROCESS: dict[str, type[PreprocessStep]] = {
    "dare": Dare,
    "breadcrumbs": Breadcrumbs,
    "topk": TopK,
}
POSTPROCESS: dict[str, type[PostprocessStep]] = {
    "lines": LiNeS,
}
_PIPELINE_KEYS = {"preprocess": PREPROCESS, "postprocess": POSTPROCESS}

# The name older code imported: a method is its MergeMethod class.
Method = MergeMethod


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InvalidParams(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


def _sentence(method: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = f"{item['msg'][0].lower()}{item['msg'][1:]}".removeprefix("value error, ")
        if not where:
            parts.append(f"{method}: {message}")
        elif item["type"] == "extra_forbidden":
            parts.append(f"{method} has no parameter {where!r}")
        else:
            parts.append(f"{method} parameter {where!r}: {message} (got {item.get('input')!r})")
    return "; ".join(parts)


@dataclass(frozen=True)
class FoldParams:
    """A stream's parameters, validated: the method's model, the processing steps, and what to store."""

    method: BaseModel
    preprocess: list[PreprocessStep]
    postprocess: list[PostprocessStep]
    stored: dict[str, Any]


def _steps(method: str, key: str, value: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    registry = _PIPELINE_KEYS[key]
    if value is None:
        return [], []
    if not isinstance(value, list):
        raise InvalidParams(f"{method} parameter {key!r} must be a list of steps like [{{\"{next(iter(registry))}\": {{}}}}]")
    steps, stored = [], []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise InvalidParams(f"{where} must be an object with one key, the step's name ({', '.join(registry)})")
        (name, step_params), = item.items()
        if name not in registry:
            raise InvalidParams(f"{where}: unknown step {name!r}; choose one of: {', '.join(registry)}")
        if step_params is None:
            step_params = {}
        if not isinstance(step_params, Mapping):
            raise InvalidParams(f"{where}.{name} must be an object of name: value, got {type(step_params).__name__}")
        try:
            model = registry[name].Params.model_validate(dict(step_params))
        except ValidationError as exc:
            raise InvalidParams(_sentence(f"{where}.{name}", exc)) from None
        steps.append(registry[name](model))
        stored.append({name: model.model_dump(by_alias=True, exclude_none=True)})
    return steps, stored


def parse_fold_params(method: str, params: Mapping[str, Any] | None) -> FoldParams:
    """The method's parameters and its pre/post-processing steps; InvalidParams with a sentence otherwise."""
    model = get_method(method).Params
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParams(f"params for {method} must be an object of name: value, got {type(params).__name__}")
    own = {k: v for k, v in params.items() if k not in _PIPELINE_KEYS}
    try:
        parsed = model.model_validate(own)
    except ValidationError as exc:
        raise InvalidParams(_sentence(method, exc)) from None
    pre, pre_stored = _steps(method, "preprocess", params.get("preprocess"))
    post, post_stored = _steps(method, "postprocess", params.get("postprocess"))
    stored = parsed.model_dump(by_alias=True, exclude_none=True)
    if pre_stored:
        stored["preprocess"] = pre_stored
    if post_stored:
        stored["postprocess"] = post_stored
    return FoldParams(parsed, pre, post, stored)


def parse_params(method: str, params: Mapping[str, Any] | None) -> BaseModel:
    """The method's parameter model, validated; InvalidParams with a readable sentence otherwise."""
    return parse_fold_params(method, params).method


def validate_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a method's parameters (and its pre/post-processing) and fill in defaults: the dict to store."""
    return parse_fold_params(method, params).stored

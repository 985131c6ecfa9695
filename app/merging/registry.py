"""The merge methods a stream can use, by name, and the validation of their parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from app.merging.errors import InvalidParams
from app.merging.methods.average import AverageParams, average_fold
from app.merging.methods.magmax import MagMaxParams, magmax_fold
from app.merging.methods.opcm import OPCMParams, opcm_update
from app.merging.methods.task_arithmetic import TaskArithmeticParams, task_arithmetic_fold
from app.merging.methods.ties import TiesParams, ties_fold


@dataclass(frozen=True)
class Method:
    """A merge method: its parameter model and its pure per-tensor function.

    ``fold_tensor`` is ``(base, previous | None, expert, *, t, **params) -> merged`` for the
    element-wise methods, which stream in one pass. OPCM's function is its unscaled update D,
    which the engine folds in two passes because of the global rescale (``two_pass``).
    """

    name: str
    params: type[BaseModel]
    fold_tensor: Callable[..., Any]
    two_pass: bool = False


METHODS: dict[str, Method] = {
    "opcm": Method("opcm", OPCMParams, opcm_update, two_pass=True),
    "average": Method("average", AverageParams, average_fold),
    "task_arithmetic": Method("task_arithmetic", TaskArithmeticParams, task_arithmetic_fold),
    "ties": Method("ties", TiesParams, ties_fold),
    "magmax": Method("magmax", MagMaxParams, magmax_fold),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InvalidParams(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


def _sentence(method: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "params"
        if item["type"] == "extra_forbidden":
            parts.append(f"{method} has no parameter {where!r}")
        else:
            parts.append(f"{method} parameter {where!r}: {item['msg'][0].lower()}{item['msg'][1:]} (got {item.get('input')!r})")
    return "; ".join(parts)


def parse_params(method: str, params: Mapping[str, Any] | None) -> BaseModel:
    """The method's parameter model, validated; InvalidParams with a readable sentence otherwise."""
    model = get_method(method).params
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParams(f"params for {method} must be an object of name: value, got {type(params).__name__}")
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        raise InvalidParams(_sentence(method, exc)) from None


def validate_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a method's parameters and fill in defaults: the dict to store with a stream."""
    return parse_params(method, params).model_dump(by_alias=True, exclude_none=True)

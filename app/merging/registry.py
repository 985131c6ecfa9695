"""The merge methods a stream can use, by name, and the validation of their parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from app.merging.errors import InvalidParams
from app.merging.methods.average import Average
from app.merging.methods.magmax import MagMax
from app.merging.methods.opcm import OPCM
from app.merging.methods.task_arithmetic import TaskArithmetic
from app.merging.methods.ties import Ties
from app.merging.protocol import MergeMethod

# One line per method: the key is the stream's ``method`` and the module's name.
METHODS: dict[str, type[MergeMethod]] = {
    "opcm": OPCM,
    "average": Average,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "magmax": MagMax,
}

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
        where = ".".join(str(p) for p in item["loc"]) or "params"
        if item["type"] == "extra_forbidden":
            parts.append(f"{method} has no parameter {where!r}")
        else:
            parts.append(f"{method} parameter {where!r}: {item['msg'][0].lower()}{item['msg'][1:]} (got {item.get('input')!r})")
    return "; ".join(parts)


def parse_params(method: str, params: Mapping[str, Any] | None) -> BaseModel:
    """The method's parameter model, validated; InvalidParams with a readable sentence otherwise."""
    model = get_method(method).Params
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

"""Replays and the champion policy (DESIGN §3.2)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.common import NAME_PATTERN
from app.schemas.evaluations import METRIC_NAME_PATTERN, check_params_size

MAX_REPLAY_EXPERTS = 10_000
MAX_CANDIDATES = 8


class ReplayCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    method: str = Field(default="opcm", max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    experts: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_REPLAY_EXPERTS,
        description="expert ids of the source stream, in the order to fold them (default: all, in arrival order)",
    )

    _params = field_validator("params")(check_params_size)


class ChampionCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=NAME_PATTERN)

    _params = field_validator("params")(check_params_size)


class ChampionPolicy(BaseModel):
    """Candidates, each run as a replay of the stream; after each expert ``@champion`` moves to the best."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1, max_length=100, pattern=METRIC_NAME_PATTERN)
    mode: Literal["max", "min"] = "max"
    min_gain: float = Field(
        default=0.0,
        ge=0.0,
        le=1e12,
        allow_inf_nan=False,
        description="hysteresis, in the metric's units: @champion stays with the candidate it holds unless another "
        "candidate's version of the same expert beats that candidate's by more than this (0: always the best)",
    )
    candidates: list[ChampionCandidate] = Field(min_length=1, max_length=MAX_CANDIDATES)

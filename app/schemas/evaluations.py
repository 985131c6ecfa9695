"""Evaluations and evaluator plugins (DESIGN §3.2): what clients post and what versions show."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_serializer, field_validator

from app.schemas.common import NAME_PATTERN
from app.schemas.common import utc_iso as _utc

# Metric names end up as JSON keys, CSV columns and Prometheus-like labels in clients: a tame charset.
METRIC_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*$"
MAX_METRICS = 100
# An evaluator plugin: an entry point name of the group ``mergeline.evaluators`` ("text-classification"),
# or a dotted path "package.module:function" (allowed only under MERGELINE_EVALUATOR_MODULES).
EVALUATOR_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?$"
MAX_PARAMS_BYTES = 16 * 1024

MetricName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=METRIC_NAME_PATTERN)]
MetricValue = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def check_params_size(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value, allow_nan=False)
    except ValueError:
        raise ValueError("params must be plain JSON (no NaN or Infinity)") from None
    if len(encoded) > MAX_PARAMS_BYTES:
        raise ValueError(f"params are {len(encoded)} bytes of JSON; at most {MAX_PARAMS_BYTES} are accepted")
    return value


class EvaluatorSpec(BaseModel):
    """The evaluator plugin a stream's worker runs on each succeeded version."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=EVALUATOR_NAME_PATTERN,
        description='an entry point of the group "mergeline.evaluators", or "module:function" where the server allows it',
    )
    params: dict[str, Any] = Field(default_factory=dict, description="passed to the plugin as `params`")

    _params = field_validator("params")(check_params_size)


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evaluator: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="what measured the metrics")
    metrics: dict[MetricName, MetricValue] = Field(
        min_length=1, max_length=MAX_METRICS, description="metric name -> finite number"
    )


class EvaluationPublic(BaseModel):
    evaluator: str
    metrics: dict[str, float] | None = None
    status: str = Field(description="queued, running, succeeded or failed (a failed evaluation never fails its version)")
    created_at: datetime
    finished_at: datetime | None = None
    error: str | None = None

    _ser = field_serializer("created_at", "finished_at")(lambda self, v: _utc(v))

"""Schemathesis over the live OpenAPI schema: no input makes the API answer 5xx, and answers match the schema.

Bounded: EXAMPLES examples per operation (MERGELINE_FUZZ_EXAMPLES for more) within a time budget
(MERGELINE_FUZZ_SECONDS). Generated stream ids are often swapped for a real stream of the caller's,
and version numbers for integers of any size, so the fuzzing reaches past the 404. Driven through schemathesis' Python API and
hypothesis directly: schemathesis' lazy pytest fixture does not run under pytest 9.
"""

from __future__ import annotations

import os
import time

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.isolation.conftest import ALICE, TwoTenants

EXAMPLES = int(os.environ.get("MERGELINE_FUZZ_EXAMPLES", "150"))
BUDGET_SECONDS = float(os.environ.get("MERGELINE_FUZZ_SECONDS", "75"))
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance]


def test_no_input_makes_a_server_error_or_breaks_the_schema(two_tenants: TwoTenants) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", two_tenants.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    deadline = time.monotonic() + BUDGET_SECONDS
    failures: list[str] = []
    calls = 0

    for operation in operations:
        if time.monotonic() > deadline:
            break

        # Valid inputs and inputs that break the schema on purpose (wrong types, out-of-range values ...).
        strategy = st.one_of(operation.as_strategy(generation_mode=mode) for mode in GenerationMode)

        @given(case=strategy, data=st.data())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def fuzz(case, data) -> None:
            nonlocal calls
            params = case.path_parameters
            # Steer the path past the 404: the caller's real stream, and version numbers of every size.
            if params and "stream_id" in params:
                params["stream_id"] = data.draw(st.sampled_from([params["stream_id"], two_tenants.stream_id]))
            if params and "number" in params:
                params["number"] = data.draw(
                    st.one_of(
                        st.just(params["number"]),
                        st.integers().map(str),
                        st.sampled_from(["0", "1", "latest"]),
                    )
                )
            # Past the budget, skip the call but only after the same draws: an example that draws less
            # when replayed is "inconsistent data generation" to hypothesis.
            if time.monotonic() > deadline:
                return
            calls += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {ALICE}"}, checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert failures == [], "\n\n".join(failures)
    assert calls >= len(operations)

"""The champion policy: after each expert, ``@champion`` moves to the candidate whose merge measured best.

A stream's policy names candidates (each a replay that follows the stream) and a metric of the
stream's evaluator. Once every candidate's version for one expert of the stream has been
evaluated -- or has failed, which leaves that candidate out of the round -- ``@champion`` moves
to the best candidate's version of that expert (``mode`` max or min; a tie goes to the earlier
candidate). With ``min_gain`` > 0 it stays with the candidate it holds (that candidate's version
of the new expert) unless another beats it by more than ``min_gain``, so that a validation
split's noise does not flip it between two close candidates. It never moves back to an older
expert's round, so a download of ``@champion`` is the best merge measured (within ``min_gain``)
for the newest expert whose round is complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy.orm import Session

from app.models import EvaluationStatus, Version, VersionStatus
from app.repositories import aliases as aliases_repo
from app.repositories import evaluations as evaluations_repo
from app.repositories import experts as experts_repo
from app.repositories import streams as streams_repo
from app.repositories import versions as versions_repo

log = logging.getLogger(__name__)
K = TypeVar("K")

_PENDING = object()


def _score(session: Session, version: Version | None, evaluator: str, metric: str) -> object:
    """The candidate version's metric; None if it cannot compete this round; _PENDING if not measured yet."""
    if version is None:
        return _PENDING
    if version.status in (VersionStatus.failed, VersionStatus.skipped):
        return None
    if version.status != VersionStatus.succeeded:
        return _PENDING
    evaluations = [e for e in evaluations_repo.for_version(session, version.id) if e.evaluator == evaluator]
    finished = [e for e in evaluations if e.status in (EvaluationStatus.succeeded, EvaluationStatus.failed)]
    if not finished:
        return _PENDING
    latest = finished[-1]
    if latest.status != EvaluationStatus.succeeded or metric not in (latest.metrics or {}):
        return None
    return float(latest.metrics[metric])


def _round(session: Session, version: Version) -> int | None:
    """The source version number of the expert this candidate version folded in."""
    expert = experts_repo.get(session, version.expert_id) if version.expert_id else None
    if expert is None or expert.source_expert_id is None:
        return None
    source_version = versions_repo.by_expert(session, expert.source_expert_id)
    return source_version.number if source_version is not None else None


def consider(session: Session, version: Version | None) -> bool:
    """Called after each evaluation of a version; moves ``@champion`` if this completed a round. True if it moved."""
    from app.services.aliases import CHAMPION, POLICY, move

    if version is None or version.expert_id is None:
        return False
    candidate = streams_repo.get(session, version.stream_id)
    if candidate is None or candidate.replay_of is None or not candidate.follows_source:
        return False
    source = streams_repo.get(session, candidate.replay_of)
    if source is None or not source.champion or not source.evaluator:
        return False
    expert = experts_repo.get(session, version.expert_id)
    round_number = _round(session, version)
    if round_number is None:
        return False
    streams_repo.lock(session, source.id)  # one decision at a time per stream
    metric, mode, evaluator = source.champion["metric"], source.champion["mode"], source.evaluator["name"]
    scored: dict[str, tuple[float, Version]] = {}  # by candidate stream, in the policy's order
    for entry in source.champion["candidates"]:
        theirs = versions_repo.by_source_expert(session, entry["stream_id"], expert.source_expert_id)
        score = _score(session, theirs, evaluator, metric)
        if score is _PENDING:
            return False
        if score is not None:
            scored[entry["stream_id"]] = (score, theirs)
    if not scored:
        log.warning("champion round %d of stream %s: no candidate has metric %r", round_number, source.id, metric)
        return False
    current = aliases_repo.get(session, source.id, CHAMPION)
    held = versions_repo.get(session, current.version_id) if current is not None else None
    if held is not None and (_round(session, held) or 0) > round_number:
        return False  # a newer expert's round already decided
    key = choose(
        [(score, stream_id) for stream_id, (score, _) in scored.items()],
        mode,
        float(source.champion.get("min_gain") or 0.0),
        held.stream_id if held is not None else None,
    )
    score, chosen = scored[key]
    if current is not None and current.version_id == chosen.id:
        return False
    move(session, source, CHAMPION, chosen, who=POLICY)
    log.info("champion of stream %s after version %d: %s v%d (%s=%g)", source.id, round_number,
             chosen.stream_id, chosen.number, metric, score)  # fmt: skip
    return True


def choose(scored: Sequence[tuple[float, K]], mode: str, min_gain: float, incumbent: K | None) -> K:
    """The candidate the round goes to: the best (a tie goes to the earlier one), unless it beats the incumbent by
    no more than ``min_gain``.

    ``scored``: (metric, candidate) of the candidates measured this round, in the policy's order.
    The incumbent is the candidate ``@champion`` holds; when it has no score this round (its fold
    or evaluation failed) the best takes the alias outright.
    """
    sign = 1.0 if mode == "max" else -1.0
    best = scored[0]
    for entry in scored[1:]:
        if sign * entry[0] > sign * best[0]:
            best = entry
    held = next((entry for entry in scored if entry[1] == incumbent), None)
    if held is not None and sign * (best[0] - held[0]) <= min_gain:
        return held[1]
    return best[1]

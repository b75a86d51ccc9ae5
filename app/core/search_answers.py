"""Asking the search service and judging its answer for completeness (docs/FORMAT-2.md 6.3).

Every answer the service gives in format 2 (a secure-kNN search, a keyword-only search, a
CKKS search's scores) names the log head it read and the digest of the segments it
searched; the client compares them with the log it verified itself (app/core/search_log.py).
The judgement, the retry it needs (the segments listed when the digests differ, the log
verified once more when the service read a newer head) and the verdict's fields on a
result are the same for every mode, so they live here, below the modes that use them
(app/core/searcher.py, app/core/ckks_search.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core.errors import IncompleteAnswer, IntegrityError, ServiceError
from app.core.repository import Repository
from app.core.search_log import log_state
from app.core.session import Session

if TYPE_CHECKING:
    from cloud.seglog import LogState, Verdict


def ask_service(session: Session, repo: Repository, token: Any, k: int,
                state: LogState | None, keywords: Any = None
                ) -> tuple[Any, Verdict | None, LogState | None]:
    """The service's answer and, in format 2, its verdict: asked once, again with the
    searched segments listed when the digests differ, the log verified again once when
    the service names a newer head than this client verified. ``keywords``: a
    cloud.keyword_index.TokenQuery travelling in the same request (``token`` None: a
    keyword-only search, ``k`` bounding the ids answered)."""
    service = session.service
    version = repo.keys.version
    extra = {} if keywords is None else {"keywords": keywords}
    if state is None:
        return service.search_v2(repo.repo_id, token, k, version, **extra), None, None
    from cloud.seglog import LogAhead

    listed = False
    verified_again = False
    while True:
        answer = service.search_v2(repo.repo_id, token, k, version,
                                   min_head=state.head.sequence, list_segments=listed,
                                   **extra)
        try:
            verdict = judge(state, version, answer)
        except LogAhead:
            if verified_again:
                raise IntegrityError(
                    f"the search service answered for log entry {answer.head_sequence} of "
                    f"repository {repo.repo_id}, which this client cannot read (its verified "
                    f"head is {state.head.sequence})") from None
            verified_again = True
            state = log_state(session, repo)
            verdict = judge(state, version, answer)
        if verdict is not None:
            return answer, verdict, state
        if listed:
            raise ServiceError("the search service did not list the segments it searched "
                               "although asked to (malformed answer)")
        listed = True


def judge(state: LogState, version: int, answer: Any) -> Verdict | None:
    """seglog.judge_answer, its errors in the client's words: LogAhead passes (the caller
    verifies again), a fork is an IntegrityError, an answer that searched what the log
    does not hold a ServiceError."""
    from cloud.seglog import AnswerError, LogAhead, LogError, judge_answer

    try:
        return judge_answer(state, version, answer.head_sequence, answer.head_hash,
                            answer.set_digest, answer.segments, answer.segment_ids)
    except LogAhead:
        raise
    except LogError as exc:
        raise IntegrityError(f"segment log of repository {state.repo_id}: {exc}") from None
    except AnswerError as exc:
        raise ServiceError(f"the search service's answer does not match the segment log "
                           f"of repository {state.repo_id}: {exc}") from None


def refuse_incomplete(version: int, verdict: Verdict | None, allow_incomplete: bool) -> None:
    """IncompleteAnswer for an answer that left out live segments of key version
    ``version``, unless the caller allows one (its result is then marked instead)."""
    if verdict is not None and not verdict.complete and not allow_incomplete:
        raise IncompleteAnswer(version, verdict.expected, verdict.searched, verdict.missing)


def completeness_fields(answer: Any, verdict: Verdict | None) -> dict[str, Any]:
    """The verdict as QueryResult's (and KeywordFound's) completeness fields; no verdict
    (format 1): not verifiable, the service's own segment count kept."""
    if verdict is None:
        return {"complete": None, "segments_expected": None,
                "segments_searched": int(answer.segments), "segments_missing": []}
    return {"complete": bool(verdict.complete), "segments_expected": int(verdict.expected),
            "segments_searched": int(verdict.searched),
            "segments_missing": list(verdict.missing)}

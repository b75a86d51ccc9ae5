"""The verified view a search reads a format-2 repository through: its segment log and
the reader of the packs that log names, both kept per session.

Every search mode the service answers (app/core/searcher.py, app/core/ckks_search.py),
the keyword filter (app/core/search_filter.py) and the facade's metadata reads judge the
service and read images against the same verified log, so the log is verified in one
place, extended from what this session verified before (one listing when nothing changed),
and the reader's index of live packs is built once per verified head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core.repository import Repository, is_format2
from app.core.session import Session

if TYPE_CHECKING:
    from app.core.packs import ImageReader
    from cloud.seglog import LogState


def log_state(session: Session, repo: Repository) -> LogState:
    """The repository's segment log verified up to its head now, extending the state this
    session verified before (one listing when nothing changed); rollback and fork are
    refused (IntegrityError) by app.core.logstate against the remembered head."""
    from app.core.logstate import verified_log

    with session.log_lock:
        since = session.log_states.get(repo.repo_id)
    state = verified_log(session.store, session.settings, repo, since=since)
    with session.log_lock:
        session.log_states[repo.repo_id] = state
    return state


def image_reader(session: Session, repo: Repository, state: LogState | None = None
                 ) -> ImageReader:
    """Metadata and previews of ``repo``'s images: per-image objects in format 1, the live
    packs of ``state`` (verified now when not given) in format 2."""
    from app.core.packs import ImageReader

    if not is_format2(repo.manifest):
        return ImageReader(session.store, repo, None)
    if state is None:
        state = log_state(session, repo)
    # One reader per verified head: its index of the live packs is built once.
    key = (repo.repo_id, repo.keys.version, state.head.sequence, state.head.hash)
    with session.log_lock:
        cached = session.readers.get(repo.repo_id)
    if cached is not None and cached[0] == key:
        known: ImageReader = cached[1]
        return known
    reader = ImageReader(session.store, repo, state)
    with session.log_lock:
        session.readers[repo.repo_id] = (key, reader)
    return reader

"""The client's side of a keyword filter on a search (issue 17; docs/KEYWORDS.md): the
tokens it sends, and the plaintext check of every image the service names.

The service evaluates the filter on tokens it cannot read, so the client trusts none of its
choices: each named image's decrypted metadata (and labels, when the query asks for labels)
must match the query here, in every search mode (app/core/searcher.py, app/core/ckks_search.py)
and in a keyword-only search. Kept in one module so that the modes check alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core.errors import ServiceError
from app.core.meta import ImageMeta
from app.core.repository import Repository, is_format2
from app.core.search_log import log_state
from app.core.session import Session

if TYPE_CHECKING:
    from app.core.keywords import Query


def keyword_tokens(repo: Repository, query: Query) -> Any:
    """The query's tokens under the keyword key of the repository's current key version:
    the version image searches ask for too (older versions' segments are rewritten under
    the new one at revocation, FORMAT-2 7.3)."""
    return query.tokens(repo.keys.keyword_key, repo.repo_id, repo.keys.version)


def check_matches(query: Query, images: list[ImageMeta], session: Session,
                  repo: Repository, labels: Any = None) -> None:
    """Every image the service named must match the query in plaintext (its decrypted
    metadata, and its labels when the query asks for labels): a service that names
    other images is caught here (ServiceError), its answer never shown."""
    from app.core.keywords import keywords_of

    wants_labels = any(c.field == "label" for c in query.clauses)
    by_image: dict[str, set[str]] = {}
    if wants_labels and images:
        by_image = labels() if labels is not None else labels_by_image(session, repo)
    for meta in images:
        if meta.error:
            raise ServiceError(f"the search service named image {meta.image_id}, whose "
                               f"metadata does not verify: {meta.error}")
        words = keywords_of(meta) | {f"label={w}" for w in by_image.get(meta.image_id, ())}
        if not query.matches(words):
            raise ServiceError(f"the search service named image {meta.image_id}, which "
                               "does not match the keyword query (malformed or hostile "
                               "answer)")


def labels_by_image(session: Session, repo: Repository) -> dict[str, set[str]]:
    """Image id -> its label words now, for every labelled image of the current key
    version (decrypted here from the live label objects, app/core/labels.py); {} for a
    format-1 repository, which has no labels."""
    if not is_format2(repo.manifest):
        return {}
    from app.core import labels as label_module

    state = log_state(session, repo)
    version = repo.keys.version
    if not label_module.live_labels(state, version):
        return {}
    segments = [o.id for o in state.segments(version)]
    _, net = label_module.net_labels(session.store, repo, state, segments, version)
    return {image_id: set(words) for image_id, words in net.items()}

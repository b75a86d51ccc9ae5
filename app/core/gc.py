"""`radcrypt gc --repo R`: remove the orphans of dead imports, never what the log keeps.

An import writes originals, a pack and a segment before the log entry that commits them
(app/core/importer.py); an import that dies before that entry leaves them behind,
unreferenced. A label change (app/core/labels.py, issue 17) does the same with its label
objects (``labels/<label_id>``): written, then named by a log entry. ``radcrypt check``
lists them all (strays in state "unreferenced", and originals of no live image); gc
deletes those older than a grace period, label objects exactly as packs and segments.

Why it is safe:

* it works from a clean check (app/core/repo_check.py) of the verified log: any
  problem (a broken log, a missing or altered object) stops it before it deletes
  anything, since "unreferenced" means nothing when the log cannot be trusted;
* it deletes only objects no log entry names: live objects, objects removed by a log
  entry (compaction deletes those after its own grace period) and objects named by
  entries after a break in the log are never touched;
* it holds the repository's exclusive lock (app/core/locks.py) for the whole run, so
  no import that takes its shared lock is running, and none can start;
* an object younger than the grace period (default 24 h; from the store's
  last-modified time) is kept: an import of a client that takes no lock, or whose lock
  went stale, has that long to commit. An object whose age the store does not tell is
  kept unless the grace period is 0;
* before deleting, the log is read again: if its head moved (some writer committed
  during the run), gc stops and deletes nothing (run it again).

In a CKKS repository (issue 19) gc also deletes the evaluation-keys object ``ckks/<v>``
(about 1.6 MB) of a key version below the current one once no live segment of that
version is left in the verified log (a revocation re-encrypted and removed them all),
when the log entry that removed the last one is older than the grace period. Never while
a segment of the version is live (a search of it needs the keys), never the current
version's or a newer one's (an importer or a pending revocation writes under those). A
stale client that later commits a segment of the old version writes the object again
(app/core/ckks_blocks.ensure_eval_keys, create-if-absent).

Who may run it: the repository's owner only (AccessDenied for anyone else). Members can
write orphans, but deleting objects from the shared bucket is a maintenance act of the
owner, like compaction's deletes of replaced objects would be if they could not be
proved unreferenced; and an owner-only rule needs no proof of who wrote an orphan (an
original names no writer). Checked against ``manifest.owner`` and, where the manifest
lists co-owners (issue 14, H6), ``manifest.co_owners``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from app.core import logstate
from app.core.compaction import require_format2
from app.core.errors import AccessDenied, IntegrityError
from app.core.locks import LockInfo, RepositoryLock
from app.core.locks import exclusive as exclusive_lock
from app.core.progress import ProgressCallback, ProgressEvent, no_progress
from app.core.repo_check import EVAL_KEYS, UNUSED, RepoCheckReport, Stray, check_repository
from app.core.repository import Repository
from app.core.settings import Settings
from cloud.backend import Store
from crypto.identity import Identity

DEFAULT_GRACE_SECONDS = 24 * 3600
ORPHAN_STATE = "unreferenced"


@dataclass
class GcReport:
    """What gc found and did. ``removed``: orphans deleted (``dry_run``: would be);
    ``kept``: orphans within the grace period (or of unknown age); ``stale_locks``:
    stale locks seen (they did not block)."""

    repo_id: str
    grace_seconds: float
    dry_run: bool
    removed: list[Stray] = field(default_factory=list)
    kept: list[Stray] = field(default_factory=list)
    stale_locks: list[LockInfo] = field(default_factory=list)
    bytes_removed: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"{verb} {s.line()}" for s in self.removed]
        out += [f"kept (within the grace period) {s.line()}" for s in self.kept]
        out += [f"stale lock ignored: {lock.line()}" for lock in self.stale_locks]
        out.append(f"repository {self.repo_id}: {verb} {len(self.removed)} orphan(s), "
                   f"{self.bytes_removed} bytes; kept {len(self.kept)} younger than the "
                   f"grace period ({self.grace_seconds:.0f} s)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "grace_seconds": self.grace_seconds,
                "dry_run": self.dry_run, "removed": [s.as_dict() for s in self.removed],
                "kept": [s.as_dict() for s in self.kept],
                "stale_locks": [lock.as_dict() for lock in self.stale_locks],
                "bytes_removed": self.bytes_removed, "seconds": round(self.seconds, 3)}


def parse_duration(text: str) -> float:
    """Seconds of "24h", "30m", "90s", "2d" or a plain number of seconds (ValueError
    naming the text otherwise)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use e.g. 24h, 30m, 90s, 2d or "
                         "seconds") from None
    if value < 0 or value != value:
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    return value


def is_owner(repo: Repository, user_id: str) -> bool:
    """The owner, or a co-owner where the manifest lists them (issue 14, H6)."""
    manifest = repo.manifest
    owners = {manifest.owner, *(c.user_id for c in getattr(manifest, "co_owners", ()))}
    return bool(user_id) and user_id in owners


def orphans(report: RepoCheckReport) -> list[Stray]:
    """The strays of a check that no log entry names (an import died before its
    commit, or a forgery), and the evaluation keys of key versions without a live
    segment (issue 19): what gc may delete."""
    return [s for s in report.strays if s.state == ORPHAN_STATE or unused_eval_keys(s)]


def unused_eval_keys(stray: Stray) -> bool:
    """A ``ckks/<v>`` object of a version below the current one whose last live segment a
    log entry removed (app/core/repo_check.py): aged by that entry, not by the object (an
    object written at the version's creation is always old, while a reader that verified
    the log just before the removal may still ask the service to score that version)."""
    return stray.type == EVAL_KEYS and stray.state == UNUSED


def _age(stray: Stray) -> float | None:
    return stray.removed_age_s if unused_eval_keys(stray) else stray.age_s


def collect_garbage(store: Store, settings: Settings | None, repo: Repository,
                    identity: Identity, *, grace_seconds: float = DEFAULT_GRACE_SECONDS,
                    dry_run: bool = False, progress: ProgressCallback = no_progress,
                    now: float | None = None, lock: RepositoryLock | None = None
                    ) -> GcReport:
    """Delete the orphans of ``repo`` older than ``grace_seconds`` (module docstring).

    Raises AccessDenied (not the owner), IntegrityError (format 1; the check found
    problems; the log moved during the run), locks.LockConflict (a fresh lock of
    another process: an import is running). ``lock``: an exclusive lock to use instead
    of a new one (tests). ``now``: the clock for ages (tests). Progress: the check's
    events, then "gc" per deleted object."""
    start = time.perf_counter()
    require_format2(repo, "gc")
    if not is_owner(repo, identity.user_id):
        raise AccessDenied(f"only the owner of repository {repo.repo_id!r} "
                           f"({repo.manifest.owner}) may run gc; user "
                           f"{identity.user_id!r} is not")
    held = lock or exclusive_lock(store, repo, identity,
                                  trust=logstate.repository_trust(store, repo))
    report = GcReport(repo.repo_id, grace_seconds, dry_run)
    with held:
        report.stale_locks = list(held.stale_seen)
        check = check_repository(store, settings, repo, progress=progress, now=now)
        if not check.ok:
            raise IntegrityError(f"repository {repo.repo_id!r} has {len(check.problems)} "
                                 f"problem(s) (first: {check.problems[0].line()}); gc "
                                 "deletes nothing until `radcrypt check` is clean")
        for stray in orphans(check):
            age = _age(stray)
            old = (grace_seconds == 0) if age is None else age >= grace_seconds
            (report.removed if old else report.kept).append(stray)
        _log_did_not_move(store, settings, repo, check)
        for done, stray in enumerate(report.removed, 1):
            if not dry_run:
                store.delete(stray.key)
            report.bytes_removed += stray.size
            progress(ProgressEvent("gc", done, len(report.removed), item=stray.id))
    report.seconds = time.perf_counter() - start
    return report


def _log_did_not_move(store: Store, settings: Settings | None, repo: Repository,
                      check: RepoCheckReport) -> None:
    """IntegrityError when the log's head is no longer the one the check verified."""
    head = logstate.verified_log(store, settings, repo).head
    if head.sequence != check.log.get("head") or head.hash.hex() != check.log.get("hash"):
        raise IntegrityError(f"the segment log of repository {repo.repo_id!r} moved during "
                             f"gc (entry {check.log.get('head')} -> {head.sequence}: a "
                             "writer without a lock committed); nothing was deleted, run "
                             "gc again")

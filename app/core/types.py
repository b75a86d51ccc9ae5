"""The core's data types a front end may name, in one module the front ends may import.

The front ends (app/cli.py, app/gui) call the facade (app/core/client.py) and receive these
objects from it; they name the types here (annotations, isinstance, error classification)
instead of importing the modules that define them, which stay the facade's business.
Importing this module loads numpy, PIL and the core's repository code (not Qt): the CLI
imports it only where it needs it.
"""

from __future__ import annotations

from app.core.access import AccessEntry, AccessList, UserRecord
from app.core.access_log import MAX_PURPOSE
from app.core.deid import Blackout
from app.core.demo import DemoReport, DemoRow
from app.core.importer import ImportReport
from app.core.repository import Manifest, Member, Repository
from app.core.searcher import Hit, HitGroup, QueryResult
from app.core.session import Session
from app.imaging.decode import DecodedImage
from app.imaging.errors import ImageDecodeError
from cloud.local import EmbeddedStoreError
from cloud.store import StoreError
from crypto.identity import Identity, PublicCard

__all__ = [
    "MAX_PURPOSE", "AccessEntry", "AccessList", "Blackout", "DecodedImage", "DemoReport",
    "DemoRow", "EmbeddedStoreError", "Hit", "HitGroup", "Identity", "ImageDecodeError",
    "ImportReport", "Manifest", "Member", "PublicCard", "QueryResult", "Repository", "Session",
    "StoreError", "UserRecord",
]

"""Fixtures of the hospital-integration tests (issue 18): a real Orthanc per module.

Servers and tools: tests/integration/servers.py (read its docstring). Orthanc and dcmtk are
skipped only when their binaries are missing (`make system-deps` installs them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

try:  # tests/integration/ is on sys.path under pytest (this conftest's folder)
    from servers import Orthanc, free_port, start_orthanc
except ImportError:  # pragma: no cover
    from tests.integration.servers import Orthanc, free_port, start_orthanc

RADCRYPT_AET = "RADCRYPT"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module (REST, DICOM, DICOMweb on 127.0.0.1), empty at start,
    knowing one peer ``radcrypt`` = (RADCRYPT, 127.0.0.1, ``orthanc.peer_port``): start a
    receiver on that port to be pushed or moved to. Stopped by PID afterwards."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"),
                           peers={"radcrypt": (RADCRYPT_AET, free_port())})
    yield server
    server.stop()

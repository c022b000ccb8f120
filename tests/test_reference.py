"""Image references and the tag template."""

from __future__ import annotations

import pytest

from agent.reference import Reference, render_tag

DIGEST = "sha256:" + "ab" * 32
PARSE = [
    ("127.0.0.1:5000/nvidia/driver:535-x", Reference("127.0.0.1:5000", "nvidia/driver", "535-x")),
    ("reg.example/a/b/c:t", Reference("reg.example", "a/b/c", "t")),
    (f"localhost/d@{DIGEST}", Reference("localhost", "d", None, DIGEST)),
    (f"reg.example:443/d:t@{DIGEST}", Reference("reg.example:443", "d", "t", DIGEST)),
]


@pytest.mark.parametrize(("text", "ref"), PARSE, ids=[p[0] for p in PARSE])
def test_parse_round_trips(text: str, ref: Reference) -> None:
    """A reference parses into its parts and prints back the same."""
    assert Reference.parse(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("text", [
    "nvidia/driver:1",  # no registry host
    "reg.example/UPPER:1",
    "reg.example/d:bad tag",
    "reg.example/d@sha256:short",
    "reg.example/d",  # neither tag nor digest
    "reg.example/../d:1",
])
def test_invalid_references_are_refused(text: str) -> None:
    """Malformed references never reach the registry API."""
    with pytest.raises(ValueError):
        Reference.parse(text)


FIELDS = {"driver": "535.261.03", "os": "ubuntu-22.04-5.15.0+rt", "os_id": "ubuntu", "os_version": "22.04",
          "kernel": "5.15.0+rt", "arch": "amd64"}


@pytest.mark.parametrize(("template", "tag"), [
    ("{driver}-{os}", "535.261.03-ubuntu-22.04-5.15.0_rt"),
    ("{os_id}-{os_version}-{driver}", "ubuntu-22.04-535.261.03"),
    ("{kernel}_{arch}", "5.15.0_rt_amd64"),
])
def test_render_tag_sanitizes_fields(template: str, tag: str) -> None:
    """Characters a tag cannot hold become '_'."""
    assert render_tag(template, FIELDS) == tag


@pytest.mark.parametrize(("template", "message"), [
    ("{driver}-{flavor}", "unknown field"),
    ("{driver:>10}", "only plain"),
    ("-{driver}", "not a valid tag"),
    ("{driver}" * 20, "not a valid tag"),
])
def test_render_tag_refuses_bad_templates(template: str, message: str) -> None:
    """Unknown fields, format specs and results that are not tags are errors."""
    with pytest.raises(ValueError, match=message):
        render_tag(template, FIELDS)

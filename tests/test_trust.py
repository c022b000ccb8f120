"""TLS trust (agent/trust.py): a broken CA file is a ConfigError naming it, whenever it is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.hostroot import HostRoot
from agent.trust import check_ca_file, trust_context


def test_a_host_ca_bundle_that_does_not_parse_is_a_config_error_naming_it(tmp_path: Path) -> None:
    bundle = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"ca-certificates\.crt: the host.s CA bundle cannot be loaded"):
        trust_context(HostRoot(tmp_path))


def test_the_operators_ca_file_is_checked_at_start_and_at_use(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("garbage\n")
    for check in (lambda: check_ca_file(HostRoot(tmp_path), "/ca.pem"),
                  lambda: trust_context(HostRoot(tmp_path), "/ca.pem")):
        with pytest.raises(ConfigError, match=r"image\.ca_file: cannot load CA certificates"):
            check()

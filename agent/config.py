"""Layered TOML configuration: vendor → runtime → admin fragments, merged onto defaults, validated."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.hostroot import HostRoot, check_host_path
from agent.reference import DIGEST_RE, REGISTRY_RE, REPOSITORY_RE, TAG_RE, render_tag

# Lowest precedence first. A later directory's file of the same name replaces
# an earlier one; a file that is a symlink to /dev/null masks the name.
CONFIG_DIRS = (
    "/usr/lib/nvidia-agent/config.d",
    "/run/nvidia-agent/config.d",
    "/etc/nvidia-agent/config.d",
)

MODULE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*\Z")
MODULE_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*\Z")
UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(service|target|socket|mount)\Z")
DRIVER_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){1,3}\Z")


@dataclass(frozen=True)
class DriverSettings:
    version: str = "535.261.03"


# Names under a driver tree's lib64/ that may be overlaid onto the host's library directory:
# NVIDIA's own libraries and the GLVND loaders the driver ships, nothing that could shadow the
# host's libc or libstdc++. From libnvidia-container's library lists and the file lists of
# NVIDIA's, Debian's, Ubuntu's and Fedora's driver packages (docs/driver-image.md).
DEFAULT_LIB64_ALLOW = (
    "libnvidia-*.so*", "libcuda.so*", "libcudadebugger.so*", "libnvcuvid.so*", "libnvoptix.so*",
    "libnvcuextend.so*", "libGLX_nvidia.so*", "libEGL_nvidia.so*", "libGLESv1_CM_nvidia.so*",
    "libGLESv2_nvidia.so*", "libGLX_indirect.so.0", "libglxserver_nvidia.so*",
    "libGL.so*", "libGLX.so*", "libGLdispatch.so*", "libOpenGL.so*", "libEGL.so*", "libGLESv1_CM.so*",
    "libGLESv2.so*", "libOpenCL.so*",
    "vdpau/libvdpau_nvidia.so*", "gbm/nvidia-drm_gbm.so", "tls/libnvidia-tls.so*", "nvidia/wine/*.dll",
    "nvidia/xorg/nvidia_drv.so", "nvidia/xorg/libglxserver_nvidia.so*", "nvidia/xorg/libglx.so*",
    "xorg/modules/drivers/nvidia_drv.so", "xorg/modules/extensions/libglxserver_nvidia.so*",
)


@dataclass(frozen=True)
class VerifySettings:
    public_key: str = ""  # a PEM public key (cosign.pub): images must carry a cosign signature by it
    match_repository: bool = False  # the signature must also name the repository pulled from (refuses mirrors)


@dataclass(frozen=True)
class ImageSettings:
    registry: str = ""  # no default: the agent trusts no registry it was not told about
    repository: str = "nvidia/driver"
    tag_template: str = "{driver}-{os}"
    plain_http: tuple[str, ...] = ()
    auth_file: str = "/etc/nvidia-agent/auth.json"
    ca_file: str = ""  # extra CA certificates (PEM) trusted beside the host's store
    timeout_s: float = 30.0
    attempts: int = 5
    mirrors: tuple[str, ...] = ()  # registries serving the same repository, tried in order before registry
    pins: Mapping[str, str] = field(default_factory=dict)  # tag or OS key -> the only digest accepted
    source: str = "auto"  # auto | engine | registry: whether the docker engine is asked first
    engine_socket: str = "/run/docker.sock"
    verify: VerifySettings = VerifySettings()


@dataclass(frozen=True)
class InstallSettings:
    root: str = "/opt/nvidia"
    keep_trees: int = 3
    lib64_allow: tuple[str, ...] = DEFAULT_LIB64_ALLOW
    bin_dir: str = "auto"  # links to the driver's tools: auto (/opt/bin on Flatcar, else /usr/local/bin), "" none
    cache_max_mib: int = 4096  # the blob cache (interrupted downloads kept to resume) stays under this
    cache_max_age_s: float = 7 * 86400.0  # and keeps nothing older


@dataclass(frozen=True)
class MountSettings:
    enabled: bool = True
    target: str = "/usr/lib64"
    ldconfig: bool = True


@dataclass(frozen=True)
class ModuleSettings:
    load: bool = True
    parameters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class UnitSettings:
    before: tuple[str, ...] = ("kubelet.service", "dcos-mesos-slave.service")


@dataclass(frozen=True)
class DaemonSettings:
    ready_timeout_s: float = 300.0
    check_interval_s: float = 300.0
    retry_initial_s: float = 10.0
    retry_max_s: float = 600.0


@dataclass(frozen=True)
class UpdateSettings:
    source: str = "auto"  # auto | update_engine | rpm-ostree | kernel-postinst | none
    poll_s: float = 60.0
    gate_listen: str = ""  # the FleetLock reboot gate, "127.0.0.1:PORT"; "" serves none
    gate_upstream: str = ""  # the fleet's FleetLock server the gate forwards granted requests to
    hold_max_s: float = 86400.0  # the gate refuses a reboot this long at most, then grants with a warning
    finish_s: float = 120.0  # a shutdown waits this long for the next boot's driver; 0: never waits


@dataclass(frozen=True)
class ExportSettings:
    """What fleet tools read (agent/fleet/): each path "" to write none."""

    textfile_dir: str = "/var/lib/node_exporter/textfile_collector"  # written only where the directory exists
    nfd_dir: str = "/etc/kubernetes/node-feature-discovery/features.d"  # likewise
    cdi_dir: str = "/var/run/cdi"
    operator_dir: str = "/run/nvidia/validations"
    events: int = 50  # phase changes and errors `status --events` keeps
    listen: str = ""  # serve GET /metrics on this "address:port"; "" serves none


@dataclass(frozen=True)
class Settings:
    driver: DriverSettings = DriverSettings()
    image: ImageSettings = ImageSettings()
    install: InstallSettings = InstallSettings()
    mount: MountSettings = MountSettings()
    modules: ModuleSettings = ModuleSettings()
    units: UnitSettings = UnitSettings()
    daemon: DaemonSettings = DaemonSettings()
    update: UpdateSettings = UpdateSettings()
    export: ExportSettings = ExportSettings()
    sources: tuple[str, ...] = ()  # the fragments merged, in order (host paths)


# --- validators: each returns the converted value or raises ValueError(what is valid)

def _string(pattern: re.Pattern[str] | None = None, valid: str = "a string") -> Callable[[Any], Any]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or (pattern and not pattern.match(value)):
            raise ValueError(valid)
        return value
    return check


def _number(minimum: float, maximum: float) -> Callable[[Any], Any]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
            raise ValueError(f"a number from {minimum:g} to {maximum:g}")
        return float(value)
    return check


def _integer(minimum: int, maximum: int) -> Callable[[Any], Any]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise ValueError(f"an integer from {minimum} to {maximum}")
        return value
    return check


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(f'"{c}"' for c in choices))
        return str(value)
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _host_path(value: Any) -> str:
    try:
        return str(check_host_path(value)) if isinstance(value, str) else _fail()
    except ValueError:
        raise ValueError("an absolute, normalized path such as /opt/nvidia") from None


def _fail() -> str:
    raise ValueError


def _optional_host_path(value: Any) -> str:
    return "" if value == "" else _host_path(value)


def _bin_dir(value: Any) -> str:
    if value == "auto":
        return "auto"
    try:
        return _optional_host_path(value)
    except ValueError:
        raise ValueError('"auto", "" (no links), or an absolute, normalized path such as /opt/bin') from None


def _registry(value: Any) -> str:
    if value == "":
        return ""
    return str(_string(REGISTRY_RE, "a registry host[:port] such as \"registry.example:5000\"")(value))


def _gate_listen(value: Any) -> str:
    from agent.update.gate import parse_listen  # noqa: PLC0415 - the gate owns its address rules

    if value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError('"" (no gate) or a loopback address and port such as "127.0.0.1:9797"')
    parse_listen(value)
    return value


def _metrics_listen(value: Any) -> str:
    from agent.httpserve import parse_address  # noqa: PLC0415

    if value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError('"" (not served) or an IP address and port such as "127.0.0.1:9835"')
    parse_address(value, loopback_only=False)
    return value


URL_RE = re.compile(r"^https?://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:.]+\])(:[0-9]{1,5})?"
                    r"(/[A-Za-z0-9._~!$&'()*+,;=:@%/\-]*)?\Z")


def _http_url(value: Any) -> str:
    if value == "":
        return ""
    return str(_string(URL_RE, '"" or an http(s) URL such as "https://fleetlock.example:8443/"')(value))


LIB_PATTERN_RE = re.compile(r"^(?!/)(?!.*(^|/)\.\.?(/|$))[^\s/][^\s]*\Z")


def _string_list(pattern: re.Pattern[str], valid: str) -> Callable[[Any], Any]:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and pattern.match(v) for v in value):
            raise ValueError(f"a list of {valid}")
        return tuple(value)
    return check


def _tag_template(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string such as \"{driver}-{os}\"")
    sample = {"driver": "535.261.03", "os": "flatcar-3815.2.0", "os_id": "flatcar",
              "os_version": "3815.2.0", "kernel": "6.1.0-28-amd64", "arch": "amd64"}
    try:
        render_tag(value, sample)
    except ValueError as exc:
        raise ValueError(f"a tag template over {{driver}} {{os}} {{os_id}} {{os_version}} "
                         f"{{kernel}} {{arch}} ({exc})") from None
    return value


def _parameters(value: Any) -> dict[str, tuple[str, ...]]:
    valid = 'a table of module name = ["param=value", ...]'
    if not isinstance(value, dict):
        raise ValueError(valid)
    out: dict[str, tuple[str, ...]] = {}
    for name, params in value.items():
        if not MODULE_NAME_RE.match(name):
            raise ValueError(f"{valid}; {name!r} is not a module name")
        out[name] = _string_list(MODULE_PARAM_RE, "param=value strings")(params)
    return out


def _verify(value: Any) -> VerifySettings:
    valid = 'a table: public_key = "/etc/nvidia-agent/cosign.pub", match_repository = false'
    if not isinstance(value, dict) or set(value) - {"public_key", "match_repository"}:
        raise ValueError(valid)
    try:
        return VerifySettings(public_key=_optional_host_path(value.get("public_key", "")),
                              match_repository=_boolean(value.get("match_repository", False)))
    except ValueError:
        raise ValueError(valid) from None


def _pins(value: Any) -> dict[str, str]:
    valid = 'a table of tag or OS key = "sha256:<64 hex>", e.g. "flatcar-3815.2.0" = "sha256:..."'
    if not isinstance(value, dict):
        raise ValueError(valid)
    out: dict[str, str] = {}
    for key, digest in value.items():
        if not TAG_RE.match(key):
            raise ValueError(f"{valid}; {key!r} is not a tag or OS key")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ValueError(f"{valid}; {key} = {digest!r} is not a sha256 digest")
        out[key] = digest
    return out


SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "driver": {"version": _string(DRIVER_VERSION_RE, "a driver version such as \"535.261.03\"")},
    "image": {
        "registry": _registry,
        "repository": _string(REPOSITORY_RE, "a lowercase repository path such as \"nvidia/driver\""),
        "tag_template": _tag_template,
        "plain_http": _string_list(REGISTRY_RE, "registry host[:port] strings"),
        "auth_file": _host_path,
        "ca_file": _optional_host_path,
        "timeout_s": _number(1, 180),  # one silent read must stay well inside the hang limit (daemon.STALL_LIMIT_S)
        "attempts": _integer(1, 100),
        "mirrors": _string_list(REGISTRY_RE, "registry host[:port] strings"),
        "pins": _pins,
        "source": _choice(("auto", "engine", "registry")),
        "engine_socket": _host_path,
        "verify": _verify,
    },
    "install": {"root": _host_path, "keep_trees": _integer(1, 100),
                "lib64_allow": _string_list(LIB_PATTERN_RE,
                                            "glob patterns relative to lib64, such as \"libnvidia-*.so*\""),
                "bin_dir": _bin_dir, "cache_max_mib": _integer(0, 1 << 30),
                "cache_max_age_s": _number(0, 365 * 86400)},
    "mount": {"enabled": _boolean, "target": _host_path, "ldconfig": _boolean},
    "modules": {"load": _boolean, "parameters": _parameters},
    "units": {"before": _string_list(UNIT_NAME_RE, "unit names such as \"kubelet.service\"")},
    "daemon": {
        "ready_timeout_s": _number(0, 86400),
        "check_interval_s": _number(1, 86400),
        "retry_initial_s": _number(0.1, 3600),
        "retry_max_s": _number(1, 86400),
    },
    "update": {
        "source": _choice(("auto", "update_engine", "rpm-ostree", "kernel-postinst", "none")),
        "poll_s": _number(5, 86400),
        "gate_listen": _gate_listen,
        "gate_upstream": _http_url,
        "hold_max_s": _number(0, 30 * 86400),
        "finish_s": _number(0, 3600),
    },
    "export": {"textfile_dir": _optional_host_path, "nfd_dir": _optional_host_path, "cdi_dir": _optional_host_path,
               "operator_dir": _optional_host_path, "events": _integer(0, 10000), "listen": _metrics_listen},
}

_SECTIONS: dict[str, type] = {
    "driver": DriverSettings, "image": ImageSettings, "install": InstallSettings,
    "mount": MountSettings, "modules": ModuleSettings, "units": UnitSettings,
    "daemon": DaemonSettings, "update": UpdateSettings, "export": ExportSettings,
}


def fragment_paths(host: HostRoot, dirs: tuple[str, ...] = CONFIG_DIRS) -> list[tuple[str, Path]]:
    """The fragments to merge, as (host path, local path), in merge order.

    Same-named files in later directories replace earlier ones; a symlink to
    /dev/null masks the name. The survivors merge in file-name order.
    """
    chosen: dict[str, tuple[str, Path]] = {}
    for d in dirs:
        local_dir = host(d)
        if not local_dir.is_dir():
            continue
        for entry in local_dir.iterdir():
            if not entry.name.endswith(".toml"):
                continue
            if entry.is_symlink() and os.readlink(entry) == "/dev/null":
                chosen.pop(entry.name, None)
                continue
            chosen[entry.name] = (f"{d}/{entry.name}", entry)
    return [chosen[name] for name in sorted(chosen)]


Values = dict[str, dict[str, Any]]
Origins = dict[tuple[str, str], str]


def merge_fragments(fragments: list[tuple[str, Mapping[str, Any]]]) -> tuple[Values, Origins]:
    """Merge parsed fragments (later wins, per key); returns values and the file each came from.

    Unknown sections or keys are errors naming the file and what is valid.
    """
    values: Values = {}
    origin: Origins = {}
    for name, data in fragments:
        for section, table in data.items():
            if section not in SCHEMA:
                raise ConfigError(name, f"[{section}]", "unknown section", ", ".join(f"[{s}]" for s in SCHEMA))
            if not isinstance(table, dict):
                raise ConfigError(name, section, "must be a table",
                                  f"[{section}] with keys " + ", ".join(SCHEMA[section]))
            for key, value in table.items():
                if key not in SCHEMA[section]:
                    raise ConfigError(name, f"{section}.{key}", "unknown key",
                                      f"keys in [{section}]: " + ", ".join(SCHEMA[section]))
                values.setdefault(section, {})[key] = value
                origin[(section, key)] = name
    return values, origin


def build_settings(values: Mapping[str, Mapping[str, Any]], origin: Mapping[tuple[str, str], str],
                   sources: tuple[str, ...] = ()) -> Settings:
    """Validate merged values onto the defaults into a frozen Settings."""
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        given = values.get(section, {})
        converted: dict[str, Any] = {}
        for key, raw in given.items():
            try:
                converted[key] = SCHEMA[section][key](raw)
            except ValueError as exc:
                raise ConfigError(origin.get((section, key), "<defaults>"), f"{section}.{key}",
                                  f"invalid value {raw!r}", str(exc)) from None
        sections[section] = cls(**converted)
    settings = Settings(**sections, sources=sources)
    _cross_check(settings, origin)
    return settings


def _cross_check(s: Settings, origin: Mapping[tuple[str, str], str]) -> None:
    if s.daemon.retry_initial_s > s.daemon.retry_max_s:
        raise ConfigError(origin.get(("daemon", "retry_initial_s"), "<defaults>"), "daemon.retry_initial_s",
                          f"{s.daemon.retry_initial_s:g} exceeds daemon.retry_max_s {s.daemon.retry_max_s:g}",
                          "retry_initial_s <= retry_max_s")


def load_settings(host: HostRoot, dirs: tuple[str, ...] = CONFIG_DIRS) -> Settings:
    """Read, merge and validate every fragment under the host root."""
    fragments: list[tuple[str, Mapping[str, Any]]] = []
    for name, local in fragment_paths(host, dirs):
        try:
            with local.open("rb") as f:
                fragments.append((name, tomllib.load(f)))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(name, None, f"not valid TOML: {exc}",
                              "TOML, see /usr/lib/nvidia-agent/config.d/00-defaults.toml") from None
        except OSError as exc:
            raise ConfigError(name, None, f"cannot read: {exc.strerror}") from None
    values, origin = merge_fragments(fragments)
    return build_settings(values, origin, tuple(name for name, _ in fragments))

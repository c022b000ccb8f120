"""Configuration: precedence of fragments, masking, validation errors that name file, key and what is valid."""

from __future__ import annotations

import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest

from agent.config import CONFIG_DIRS, Settings, load_settings
from agent.errors import ConfigError
from agent.hostroot import HostRoot
from tests.conftest import write

USR, RUN, ETC = CONFIG_DIRS
REPO = Path(__file__).parent.parent


def frag(root: Path, directory: str, name: str, text: str) -> None:
    write(root / directory.lstrip("/") / name, text)


def test_no_fragments_gives_the_defaults(tmp_path: Path) -> None:
    """With no configuration at all the agent runs on its defaults."""
    assert load_settings(HostRoot(tmp_path)) == Settings()


def test_precedence_usr_then_run_then_etc_and_same_name_replaces(tmp_path: Path) -> None:
    """/etc overrides /run overrides /usr/lib; a same-named file replaces the lower one whole."""
    frag(tmp_path, USR, "10-vendor.toml", '[driver]\nversion = "470.1"\n[image]\nrepository = "vendor/drv"\n')
    frag(tmp_path, RUN, "10-vendor.toml", '[image]\nrepository = "run/drv"\n')  # replaces the /usr file
    frag(tmp_path, ETC, "20-admin.toml", '[image]\nregistry = "reg.example:5000"\n')
    s = load_settings(HostRoot(tmp_path))
    assert s.driver.version == Settings().driver.version  # the /usr fragment was replaced, not merged
    assert s.image.repository == "run/drv"
    assert s.image.registry == "reg.example:5000"
    assert s.sources == (f"{RUN}/10-vendor.toml", f"{ETC}/20-admin.toml")


def test_later_file_name_wins_within_merge(tmp_path: Path) -> None:
    """Fragments merge in file-name order whatever directory they came from."""
    frag(tmp_path, ETC, "10-a.toml", '[install]\nkeep_trees = 5\n')
    frag(tmp_path, USR, "90-z.toml", '[install]\nkeep_trees = 7\n')
    assert load_settings(HostRoot(tmp_path)).install.keep_trees == 7


def test_dev_null_symlink_masks_a_fragment(tmp_path: Path) -> None:
    """An admin masks a vendor fragment with a symlink to /dev/null of the same name."""
    frag(tmp_path, USR, "50-vendor.toml", '[units]\nbefore = ["a.service"]\n')
    mask = tmp_path / ETC.lstrip("/") / "50-vendor.toml"
    mask.parent.mkdir(parents=True)
    mask.symlink_to("/dev/null")
    assert load_settings(HostRoot(tmp_path)).units.before == Settings().units.before


BAD = [
    ('[driver]\nversion = "latest"\n', "driver.version", "535.261.03"),
    ('[image]\nregistry = "http://reg"\n', "image.registry", "host[:port]"),
    ('[image]\nrepository = "Nvidia/Driver"\n', "image.repository", "lowercase"),
    ('[image]\ntag_template = "{driver}-{distro}"\n', "image.tag_template", "{os_id}"),
    ('[image]\ntag_template = "{driver!r}"\n', "image.tag_template", "tag template"),
    ('[image]\nattempts = 0\n', "image.attempts", "integer from 1"),
    ('[image]\ntimeout_s = true\n', "image.timeout_s", "number"),
    ('[install]\nroot = "opt/nvidia"\n', "install.root", "absolute"),
    ('[install]\nroot = "/opt/../etc"\n', "install.root", "absolute, normalized"),
    ('[mount]\nenabled = "yes"\n', "mount.enabled", "true or false"),
    ('[modules.parameters]\nnvidia = "NVreg_X=1"\n', "modules.parameters", "param=value"),
    ('[modules.parameters]\n"Bad Name" = []\n', "modules.parameters", "not a module name"),
    ('[units]\nbefore = ["kubelet"]\n', "units.before", "kubelet.service"),
    ('[units]\nbefor = ["kubelet.service"]\n', "units.befor", "keys in [units]"),
    ('[drivers]\nversion = "1.2"\n', "[drivers]", "[driver]"),
    ('image = "x"\n', "image", "[image] with keys"),
    ('[daemon]\nretry_initial_s = 900\n', "daemon.retry_initial_s", "retry_initial_s <= retry_max_s"),
    ('[update]\nsource = "zincati"\n', "update.source", '"rpm-ostree", "kernel-postinst", "none"'),
    ('[update]\npoll_s = 1\n', "update.poll_s", "number"),
    ('[update]\ngate_listen = "0.0.0.0:9797"\n', "update.gate_listen", "loopback"),
    ('[update]\ngate_listen = "127.0.0.1"\n', "update.gate_listen", "loopback address and port"),
    ('[update]\ngate_listen = "[::1]:0"\n', "update.gate_listen", "loopback address and port"),
    ('[update]\ngate_upstream = "ftp://lock.example/"\n', "update.gate_upstream", "http(s) URL"),
    ('[update]\ngate_upstream = "http://user@lock.example/"\n', "update.gate_upstream", "http(s) URL"),
    ('[update]\nhold_max_s = -1\n', "update.hold_max_s", "number from 0"),
    ('[update]\nfinish_s = 7200\n', "update.finish_s", "number from 0 to 3600"),
]


@pytest.mark.parametrize(("text", "key", "valid"), BAD, ids=[b[1] for b in BAD])
def test_bad_value_names_file_key_and_what_is_valid(tmp_path: Path, text: str, key: str, valid: str) -> None:
    """Every invalid setting is refused with the file, the key and the valid form."""
    frag(tmp_path, ETC, "60-admin.toml", text)
    with pytest.raises(ConfigError) as err:
        load_settings(HostRoot(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{ETC}/60-admin.toml: {key}"), message
    assert valid in message, message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A syntax error names the file and the position."""
    frag(tmp_path, ETC, "1.toml", "[driver\n")
    with pytest.raises(ConfigError, match=rf"^{ETC}/1.toml: not valid TOML"):
        load_settings(HostRoot(tmp_path))


def test_good_fragment_is_converted(tmp_path: Path) -> None:
    """Lists become tuples and parameters a mapping of tuples in the frozen settings."""
    frag(tmp_path, ETC, "1.toml", '[modules.parameters]\nnvidia = ["NVreg_EnableGpuFirmware=0"]\n'
                                  '[image]\nplain_http = ["10.0.0.1:5000"]\n')
    s = load_settings(HostRoot(tmp_path))
    assert s.modules.parameters == {"nvidia": ("NVreg_EnableGpuFirmware=0",)}
    assert s.image.plain_http == ("10.0.0.1:5000",)


def test_shipped_defaults_file_matches_the_code_defaults() -> None:
    """etc/nvidia-agent/00-defaults.toml documents exactly the defaults the code uses."""
    shipped = tomllib.loads((REPO / "etc/nvidia-agent/00-defaults.toml").read_text())
    defaults = asdict(Settings())
    defaults.pop("sources")
    normalized = {sec: {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v)
                        for k, v in keys.items()} for sec, keys in defaults.items()}
    assert shipped == normalized

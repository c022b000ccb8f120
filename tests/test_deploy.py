"""The deployment recipes in packaging/deploy/: each Butane file is the Ignition JSON beside it, the
names agree with what packaging/build-sysext builds, the systemd-sysupdate transfer is one that
sysupdate.d(5) describes, and what the Ignition config writes is a configuration the agent accepts.

No butane, ignition or systemd-sysupdate binary can be had here (Debian 12 ships none of them):
the Butane-to-Ignition step and Ignition's files stage are modelled by tests/support/ignition.py,
which refuses any field it does not model; the VM tier (tests/vm/test_vm_sysext.py) boots a guest
that the Ignition configs were applied to. systemd-sysupdate itself is not run anywhere here.
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_settings
from agent.hostroot import HostRoot
from tests.support import ignition

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "packaging/deploy"
RECIPES = ("flatcar", "fcos")


def build_sysext() -> Any:
    loader = importlib.machinery.SourceFileLoader("build_sysext", str(REPO / "packaging/build-sysext"))
    spec = importlib.util.spec_from_loader("build_sysext", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def recipe(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return yaml.safe_load((DEPLOY / f"{name}.bu").read_text()), json.loads((DEPLOY / f"{name}.ign").read_text())


def file_entry(ign: dict[str, Any], path: str) -> dict[str, Any]:
    found = [f for f in ign["storage"]["files"] if f["path"] == path]
    assert len(found) == 1, f"{path}: {len(found)} entries"
    return found[0]


def unit_entry(ign: dict[str, Any], name: str) -> dict[str, Any]:
    found = [u for u in ign["systemd"]["units"] if u["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} entries"
    return found[0]


def transfer() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    cp.read_string((DEPLOY / "nvidia-agent.conf").read_text())
    return cp


@pytest.mark.parametrize("name", RECIPES)
def test_the_ignition_json_is_what_the_butane_file_stands_for(name: str) -> None:
    bu, ign = recipe(name)
    assert ignition.translate(bu, DEPLOY) == ign, \
        f"packaging/deploy/{name}.ign is stale: python -m tests.support.ignition packaging/deploy/{name}.bu"


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipe_places_the_image_that_build_sysext_builds(name: str) -> None:
    bs = build_sysext()
    image = f"{bs.NAME}-{bs.version()}-{bs.ARCHITECTURE}.raw"
    _, ign = recipe(name)
    raw = file_entry(ign, f"/opt/extensions/nvidia-agent/{image}")
    assert raw["contents"]["source"].endswith("/" + image)
    assert raw["mode"] == 0o644
    links = {ln["path"]: ln for ln in ign["storage"]["links"]}
    # systemd-sysext matches extension-release.<NAME> against the name it finds the image under
    link = links[f"/etc/extensions/{bs.NAME}.raw"]
    assert link["target"] == raw["path"] and link.get("hard") is False
    cp = transfer()
    assert cp["Target"]["CurrentSymlink"] == link["path"]
    assert cp["Target"]["Path"] == str(Path(raw["path"]).parent)
    assert raw["contents"]["source"].startswith(cp["Source"]["Path"])
    conf = file_entry(ign, "/etc/sysupdate.nvidia-agent.d/nvidia-agent.conf")["contents"]
    shipped = ignition.read_source(conf["source"], {}, conf.get("compression"))
    assert shipped == (DEPLOY / "nvidia-agent.conf").read_bytes()


def test_fcos_carries_flatcars_ensure_sysext_unit_and_flatcar_needs_none() -> None:
    _, fcos = recipe("fcos")
    unit = unit_entry(fcos, "ensure-sysext.service")
    assert unit["contents"] == (DEPLOY / "ensure-sysext.service").read_text()
    assert unit["enabled"] is True
    assert unit_entry(fcos, "systemd-sysext.service")["enabled"] is True
    _, flatcar = recipe("flatcar")
    assert not [u for u in flatcar["systemd"]["units"] if "sysext" in u["name"] and "sysupdate" not in u["name"]]


# sysupdate.d(5), systemd 257: the keys of each section, and the types a url-file source may feed.
SYSUPDATE_KEYS = {
    "Transfer": {"MinVersion", "ProtectVersion", "Verify", "Features", "RequisiteFeatures"},
    "Source": {"Type", "Path", "PathRelativeTo", "MatchPattern"},
    "Target": {"Type", "Path", "PathRelativeTo", "MatchPattern", "MatchPartitionType", "PartitionUUID",
               "PartitionFlags", "PartitionNoAuto", "PartitionGrowFileSystem", "ReadOnly", "Mode", "TriesDone",
               "TriesLeft", "InstancesMax", "RemoveTemporary", "CurrentSymlink"},
}


def match_pattern(pattern: str, arch: str) -> re.Pattern[str]:
    """A sysupdate MatchPattern as a regex: @v the version, %a the architecture (x86-64)."""
    out, i = "", 0
    while i < len(pattern):
        two = pattern[i:i + 2]
        if two == "@v":
            out += r"(?P<v>[A-Za-z0-9.~^_+-]+?)"
        elif two == "%a":
            out += re.escape(arch)
        elif two[:1] in "@%":
            raise AssertionError(f"{two} in {pattern}: not modelled here")
        else:
            out += re.escape(pattern[i])
            i += 1
            continue
        i += 2
    return re.compile(out + "$")


def test_the_sysupdate_transfer_is_well_formed_and_finds_the_built_image() -> None:
    cp = transfer()
    assert set(cp.sections()) == set(SYSUPDATE_KEYS)
    for section, keys in SYSUPDATE_KEYS.items():
        assert set(cp[section]) <= keys, f"[{section}] {sorted(set(cp[section]) - keys)} not in sysupdate.d(5)"
    assert cp["Transfer"]["Verify"] == "true", "an image that loads kernel modules is never taken unsigned"
    assert cp["Source"]["Type"] == "url-file" and cp["Target"]["Type"] == "regular-file"
    assert cp["Source"]["Path"].startswith("https://") and cp["Source"]["Path"].endswith("/")
    assert Path(cp["Target"]["Path"]).is_absolute() and cp["Target"]["CurrentSymlink"].startswith("/etc/extensions/")
    assert int(cp["Target"]["InstancesMax"]) >= 2, "the running version and the new one"
    bs = build_sysext()
    built = f"{bs.NAME}-{bs.version()}-{bs.ARCHITECTURE}.raw"
    for section in ("Source", "Target"):
        m = match_pattern(cp[section]["MatchPattern"], bs.ARCHITECTURE).match(built)
        assert m and m["v"] == bs.version(), (section, cp[section]["MatchPattern"], built)
        # and only that architecture
        assert not match_pattern(cp[section]["MatchPattern"], bs.ARCHITECTURE).match(built.replace("x86-64", "arm64"))


@pytest.mark.parametrize("name", RECIPES)
def test_applying_the_recipe_gives_a_configuration_the_agent_accepts(name: str, tmp_path: Path) -> None:
    _, ign = recipe(name)
    root = tmp_path / "root"
    (root / "usr/lib/nvidia-agent/config.d").mkdir(parents=True)
    shutil.copy(REPO / "etc/nvidia-agent/00-defaults.toml", root / "usr/lib/nvidia-agent/config.d/00-defaults.toml")
    image = tmp_path / "image.raw"
    image.write_bytes(b"squashfs stand-in")
    url = next(f["contents"]["source"] for f in ign["storage"]["files"] if f["path"].endswith(".raw"))
    calls: list[list[str]] = []
    written = ignition.apply(ign, root, {url: image}, run=calls.append)
    assert "/etc/extensions/nvidia-agent.raw" in written
    target = (root / "etc/extensions/nvidia-agent.raw").readlink()
    assert target == Path("/opt/extensions/nvidia-agent") / url.rsplit("/", 1)[1]
    assert HostRoot(root)(str(target)).read_bytes() == b"squashfs stand-in"
    settings = load_settings(HostRoot(root))
    assert settings.image.registry == "registry.example:5000"
    enabled = [u["name"] for u in ign["systemd"]["units"] if u.get("enabled")]
    assert (root / ignition.PRESET).read_text().split("\n")[:-1] == [f"enable {u}" for u in enabled]
    assert calls == [["systemctl", f"--root={root}", "preset", *enabled]]
    timer = (root / "etc/systemd/system/nvidia-agent-sysupdate.timer").read_text()
    assert "WantedBy=timers.target" in timer
    service = (root / "etc/systemd/system/nvidia-agent-sysupdate.service").read_text()
    assert "systemd-sysupdate -C nvidia-agent update" in service


# ----------------------------------------------------------------------------- the model refuses

def test_translate_refuses_a_field_it_does_not_model() -> None:
    bu, _ = recipe("fcos")
    bu["storage"]["files"][0]["user"] = {"name": "core"}
    with pytest.raises(ignition.RecipeError, match=r"storage.files\[0\]: unsupported field.*user"):
        ignition.translate(bu, DEPLOY)
    bu, _ = recipe("fcos")
    bu["passwd"] = {"users": []}
    with pytest.raises(ignition.RecipeError, match=r"unsupported field.*passwd"):
        ignition.translate(bu, DEPLOY)
    bu, _ = recipe("fcos")
    bu["version"] = "1.4.0"
    with pytest.raises(ignition.RecipeError, match="not modelled"):
        ignition.translate(bu, DEPLOY)


def test_translate_refuses_relative_paths_and_local_files_outside_the_files_dir() -> None:
    bu, _ = recipe("flatcar")
    bu["storage"]["files"][1]["path"] = "etc/nvidia-agent/x.toml"
    with pytest.raises(ignition.RecipeError, match="absolute"):
        ignition.translate(bu, DEPLOY)
    bu, _ = recipe("flatcar")
    bu["storage"]["files"][2]["contents"] = {"local": "../build-sysext"}
    with pytest.raises(ignition.RecipeError, match="escapes the files directory"):
        ignition.translate(bu, DEPLOY)


def test_apply_fails_like_ignition_on_an_existing_file_and_on_a_source_it_cannot_fetch(tmp_path: Path) -> None:
    _, ign = recipe("flatcar")
    root = tmp_path / "root"
    (root / "etc/nvidia-agent/config.d").mkdir(parents=True)
    (root / "etc/nvidia-agent/config.d/50-registry.toml").write_text("# the administrator's\n")
    url = ign["storage"]["files"][0]["contents"]["source"]
    (tmp_path / "x.raw").write_bytes(b"x")
    with pytest.raises(ignition.RecipeError, match="exists and overwrite is false"):
        ignition.apply(ign, root, {url: tmp_path / "x.raw"}, run=lambda argv: None)
    with pytest.raises(ignition.RecipeError, match="no local file stands for"):
        ignition.apply(ign, tmp_path / "other", {}, run=lambda argv: None)


@pytest.mark.parametrize("data", [b"", b"[image]\nregistry = \"r:5000\"\n", bytes(range(256)) * 4,
                                  "ünïcode %20 ,;".encode(), (DEPLOY / "nvidia-agent.conf").read_bytes()])
def test_contents_round_trip_in_every_encoding_butane_picks(data: bytes) -> None:
    assert ignition.read_source(ignition.data_url(data), {}) == data
    contents = ignition.butane_contents(data)
    assert ignition.read_source(contents["source"], {}, contents["compression"]) == data
    assert contents["compression"] in ("", "gzip")


def test_butane_picks_the_shortest_encoding() -> None:
    assert ignition.butane_contents(b"[image]\n")["source"].startswith("data:,")
    assert ignition.butane_contents(bytes(range(256)))["source"].startswith("data:;base64,")
    text = (DEPLOY / "nvidia-agent.conf").read_bytes()  # long and repetitive: gzip wins
    assert ignition.butane_contents(text)["compression"] == "gzip"

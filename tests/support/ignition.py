"""The part of Butane and Ignition that the deployment recipes in packaging/deploy/ use.

No `butane` or `ignition` binary can be had here, so the recipes are checked and applied by this
module, which knows exactly the fields they use and refuses every other one (a recipe that grows
a field this does not model fails its test instead of being half-applied):

    translate(butane_yaml, files_dir) -> Ignition config   what `butane --strict --files-dir` emits
    apply(ignition, root, sources)                            what Ignition's files stage writes

Butane: https://coreos.github.io/butane/ (variants fcos 1.5.0 -> Ignition 3.4.0, flatcar 1.0.0 ->
Ignition 3.3.0). Ignition's files stage writes files, directories and links under the new root,
unit files and drop-ins under /etc/systemd/system, and `enable`/`disable` lines in
/etc/systemd/system-preset/20-ignition.preset, which systemd applies on the first boot. Here the
presets are applied at once with `systemctl --root ROOT preset`, as systemd's first boot would.

    python -m tests.support.ignition packaging/deploy/fcos.bu   # rewrites packaging/deploy/fcos.ign
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

IGNITION_VERSION = {("fcos", "1.5.0"): "3.4.0", ("flatcar", "1.0.0"): "3.3.0"}
PRESET = "etc/systemd/system-preset/20-ignition.preset"

_FILE_KEYS = {"path", "mode", "contents", "overwrite"}
_CONTENTS_KEYS = {"source", "inline", "local", "verification"}
_LINK_KEYS = {"path", "target", "hard", "overwrite"}
_DIR_KEYS = {"path", "mode"}
_UNIT_KEYS = {"name", "enabled", "mask", "contents", "dropins"}
_DROPIN_KEYS = {"name", "contents"}


class RecipeError(ValueError):
    """A recipe uses something this model does not know, or is wrong by the spec."""


def _only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(obj, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(obj).__name__}")
    extra = set(obj) - allowed
    if extra:
        raise RecipeError(f"{where}: unsupported field(s) {sorted(extra)} (this model knows {sorted(allowed)})")


def data_url(text: bytes) -> str:
    """The percent-encoded form: data:, and the bytes percent-encoded."""
    return "data:," + urllib.parse.quote(text, safe="")


def butane_contents(data: bytes) -> dict[str, str]:
    """How Butane (base/util/url.go, MakeDataURL) embeds inline and local contents: the shortest of
    percent-encoded, base64, and gzip (best compression) + base64 with `compression: gzip`;
    `compression` is always set, "" when not compressed. The choice is Butane's; the gzip bytes
    are this zlib's, not Go's, so a butane-made file may differ byte for byte, never in content."""
    best = data_url(data)
    b64 = "data:;base64," + base64.b64encode(data).decode()
    if len(b64) < len(best):
        best = b64
    gz = "data:;base64," + base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode()
    if len(gz) + len("gzip") < len(best):
        return {"compression": "gzip", "source": gz}
    return {"compression": "", "source": best}


def _abs(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or ".." in PurePosixPath(path).parts:
        raise RecipeError(f"{where}: path must be absolute without '..', got {path!r}")
    return path


def translate(butane: Mapping[str, Any], files_dir: Path) -> dict[str, Any]:
    """Ignition config for a Butane config (the subset above)."""
    _only(butane, {"variant", "version", "storage", "systemd"}, "butane")
    key = (butane.get("variant"), butane.get("version"))
    if key not in IGNITION_VERSION:
        raise RecipeError(f"butane: variant/version {key} not modelled: {sorted(IGNITION_VERSION)}")
    out: dict[str, Any] = {"ignition": {"version": IGNITION_VERSION[key]}}  # type: ignore[index]
    storage = butane.get("storage") or {}
    _only(storage, {"files", "links", "directories"}, "storage")
    st: dict[str, Any] = {}
    for i, d in enumerate(storage.get("directories") or []):
        _only(d, _DIR_KEYS, f"storage.directories[{i}]")
        st.setdefault("directories", []).append({"path": _abs(d["path"], f"directories[{i}]"),
                                                 **({"mode": d["mode"]} if "mode" in d else {})})
    for i, f in enumerate(storage.get("files") or []):
        where = f"storage.files[{i}]"
        _only(f, _FILE_KEYS, where)
        entry: dict[str, Any] = {"path": _abs(f["path"], where)}
        c = f.get("contents") or {}
        _only(c, _CONTENTS_KEYS, where + ".contents")
        if sum(k in c for k in ("source", "inline", "local")) != 1:
            raise RecipeError(f"{where}.contents: exactly one of source, inline, local")
        if "inline" in c:
            contents = butane_contents(str(c["inline"]).encode())
        elif "local" in c:
            local = (files_dir / c["local"]).resolve()
            if not local.is_relative_to(files_dir.resolve()):
                raise RecipeError(f"{where}.contents.local escapes the files directory: {c['local']!r}")
            contents = butane_contents(local.read_bytes())
        else:
            if urllib.parse.urlsplit(c["source"]).scheme not in ("https", "http", "s3", "gs", "tftp", "data"):
                raise RecipeError(f"{where}.contents.source: not a URL Ignition fetches: {c['source']!r}")
            contents = {"source": c["source"]}
        if "verification" in c:
            contents["verification"] = c["verification"]
        entry["contents"] = contents
        if "mode" in f:
            entry["mode"] = int(f["mode"])
        if "overwrite" in f:
            entry["overwrite"] = bool(f["overwrite"])
        st.setdefault("files", []).append(entry)
    for i, ln in enumerate(storage.get("links") or []):
        where = f"storage.links[{i}]"
        _only(ln, _LINK_KEYS, where)
        st.setdefault("links", []).append({"path": _abs(ln["path"], where), "target": ln["target"],
                                           **{k: bool(ln[k]) for k in ("hard", "overwrite") if k in ln}})
    if st:
        out["storage"] = st
    systemd = butane.get("systemd") or {}
    _only(systemd, {"units"}, "systemd")
    units = []
    for i, u in enumerate(systemd.get("units") or []):
        where = f"systemd.units[{i}]"
        _only(u, _UNIT_KEYS, where)
        unit: dict[str, Any] = {"name": u["name"]}
        for k in ("contents", "enabled", "mask"):
            if k in u:
                unit[k] = u[k]
        if "dropins" in u:
            unit["dropins"] = []
            for j, d in enumerate(u["dropins"]):
                _only(d, _DROPIN_KEYS, f"{where}.dropins[{j}]")
                unit["dropins"].append(dict(d))
        units.append(unit)
    if units:
        out["systemd"] = {"units": units}
    return out


def read_source(url: str, sources: Mapping[str, Path], compression: str | None = None) -> bytes:
    """The bytes a file's contents.source stands for: a data URL, or a remote URL mapped to a local file."""
    if url.startswith("data:"):
        meta, _, payload = url[5:].partition(",")
        data = base64.b64decode(payload) if meta.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    elif url in sources:
        data = sources[url].read_bytes()
    else:
        raise RecipeError(f"no local file stands for {url} (this run has: {sorted(sources)})")
    if compression == "gzip":
        data = gzip.decompress(data)
    elif compression:  # "" or absent: not compressed
        raise RecipeError(f"compression {compression!r} not modelled")
    return data


def _check_ignition(ign: Mapping[str, Any]) -> None:
    _only(ign, {"ignition", "storage", "systemd"}, "ignition config")
    version = (ign.get("ignition") or {}).get("version", "")
    if version not in IGNITION_VERSION.values():
        raise RecipeError(f"ignition.version {version!r} not modelled")
    _only(ign.get("storage") or {}, {"files", "links", "directories"}, "storage")
    for i, f in enumerate((ign.get("storage") or {}).get("files") or []):
        _only(f, _FILE_KEYS, f"storage.files[{i}]")
        _only(f.get("contents") or {}, {"source", "compression", "verification"}, f"storage.files[{i}].contents")
    for i, ln in enumerate((ign.get("storage") or {}).get("links") or []):
        _only(ln, _LINK_KEYS, f"storage.links[{i}]")
    _only(ign.get("systemd") or {}, {"units"}, "systemd")
    for i, u in enumerate((ign.get("systemd") or {}).get("units") or []):
        _only(u, _UNIT_KEYS, f"systemd.units[{i}]")


def _under(root: Path, path: str) -> Path:
    p = root / path.lstrip("/")
    if not p.resolve().is_relative_to(root.resolve()):
        raise RecipeError(f"{path} leads out of the root")
    return p


def apply(ign: Mapping[str, Any], root: Path, sources: Mapping[str, Path],
          run: Callable[[list[str]], None] | None = None) -> list[str]:
    """Write what Ignition's files stage writes for `ign` into `root`; returns the paths written."""
    _check_ignition(ign)
    written: list[str] = []
    storage = ign.get("storage") or {}
    for d in storage.get("directories") or []:
        p = _under(root, d["path"])
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(d.get("mode", 0o755))
        written.append(d["path"])
    for f in storage.get("files") or []:
        p = _under(root, f["path"])
        if (p.exists() or p.is_symlink()) and not f.get("overwrite", False):
            raise RecipeError(f"{f['path']} exists and overwrite is false: Ignition fails the boot here")
        c = f["contents"]
        data = read_source(c["source"], sources, c.get("compression"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        p.write_bytes(data)
        p.chmod(f.get("mode", 0o644))
        written.append(f["path"])
    for ln in storage.get("links") or []:
        p = _under(root, ln["path"])
        if (p.exists() or p.is_symlink()) and not ln.get("overwrite", False):
            raise RecipeError(f"{ln['path']} exists and overwrite is false")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        if ln.get("hard"):
            os.link(_under(root, ln["target"]), p)
        else:
            p.symlink_to(ln["target"])
        written.append(ln["path"])
    presets: list[str] = []
    for u in (ign.get("systemd") or {}).get("units") or []:
        unit_dir = root / "etc/systemd/system"
        if "contents" in u:
            p = unit_dir / u["name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.unlink(missing_ok=True)
            p.write_text(u["contents"])
            written.append(f"/etc/systemd/system/{u['name']}")
        for d in u.get("dropins") or []:
            p = unit_dir / f"{u['name']}.d" / d["name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(d["contents"])
            written.append(f"/etc/systemd/system/{u['name']}.d/{d['name']}")
        if u.get("mask"):
            p = unit_dir / u["name"]
            p.unlink(missing_ok=True)
            p.symlink_to("/dev/null")
        if "enabled" in u:
            presets.append(f"{'enable' if u['enabled'] else 'disable'} {u['name']}")
    if presets:
        p = root / PRESET
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(line + "\n" for line in presets))
        written.append("/" + PRESET)
        names = [line.split()[1] for line in presets]
        (run or _run)(["systemctl", f"--root={root}", "preset", *names])
    return written


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    import yaml  # noqa: PLC0415 - the test group's, needed only to translate

    for name in argv or sys.exit("usage: python -m tests.support.ignition RECIPE.bu ..."):
        bu = Path(name)
        ign = translate(yaml.safe_load(bu.read_text()), bu.parent)
        bu.with_suffix(".ign").write_text(json.dumps(ign, indent=2) + "\n")
        print(f"wrote {bu.with_suffix('.ign')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The `nvidia-agent` command: daemon, status, config, preflight."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__, log
from agent.cancel import Cancel
from agent.config import CONFIG_DIRS, Settings, load_settings
from agent.credentials import Credentials
from agent.daemon import LOCK_FILE, LockHeld, Triggers, acquire_lock, run_daemon
from agent.devices import pci_monitor
from agent.errors import AgentError, ConfigError, ExitCode
from agent.fetch.manifest import Platform
from agent.hostfacts import HostProbe, oci_arch
from agent.hostroot import HostRoot
from agent.notify import Notifier
from agent.plan import target_for_boot
from agent.reconcile import Agent
from agent.reference import Reference, normalize
from agent.state import IMAGES_DIR
from agent.status import SOCKET_FILE, Phase, ask, query, render_events, render_progress, render_text

if TYPE_CHECKING:  # the commands that fetch import these when they run: `status` and an unchanged boot never do
    from agent.fetch.registry import RegistryClient
    from agent.fetch.sources import Trust

DESCRIPTION = """\
Keeps the prebuilt NVIDIA driver that matches the running kernel installed
under /opt/nvidia/<driver>/<os>, visible under /usr/lib64 and loaded.

Run under systemd:   systemctl enable --now nvidia-agent.service
Ask it:              nvidia-agent status        (exit 0 ready, 2 degraded, 1 failed/unreachable)
Read its log:        journalctl -u nvidia-agent -p warning
"""

EPILOG = f"""\
configuration (later overrides earlier, same file name replaces, a symlink to /dev/null masks):
  {chr(10).join('  ' + d + '/*.toml' for d in CONFIG_DIRS).strip()}
exit statuses: 0 ready, 1 failed, 2 degraded, 64 usage, 69 daemon not running (stage),
  75 another daemon runs, 78 bad configuration
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvidia-agent", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nvidia-agent {__version__}")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="host root every host path hangs off (default /; tests use a sandboxed root)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("daemon", help="reconcile now, then keep the driver matched (what the unit runs)",
                       description="Reconcile at start, then every daemon.check_interval_s, on SIGHUP, and with "
                                   "backoff after a failure. Serves `status` on " + SOCKET_FILE + ".")
    d.add_argument("--once", action="store_true",
                   help="reconcile once and exit: 0 ready (or no GPU), 2 degraded, 78 bad configuration")
    d.add_argument("-v", "--verbose", action="store_true", help="log debug events too")

    s = sub.add_parser("status", help="show what the running daemon did and why",
                       description="Ask the daemon over its Unix socket. Exit 0 ready (or no GPU), "
                                   "2 degraded or still working, 1 failed or daemon not reachable.")
    s.add_argument("--json", action="store_true", help="print the full status as JSON (events included)")
    s.add_argument("--events", action="store_true", help="print the last phase changes and errors, oldest first, "
                   "each with how long the phase before it lasted (export.events keeps them)")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for the daemon to be reachable and ready")
    _socket_argument(s)

    st = sub.add_parser(
        "stage", help="install the driver for the kernel the next boot runs, before the reboot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tell the running daemon that the next boot runs KERNEL (plain distributions: the\n"
                    "kernel package's hook /etc/kernel/postinst.d/nvidia-agent runs this with the new\n"
                    "release). The daemon installs that kernel's driver beside the current one without\n"
                    "activating it, so the first boot of KERNEL is ready with no network. Root only.\n"
                    "On Flatcar and Fedora/RHEL CoreOS the updater says it (update.source) and this\n"
                    "is refused.\n\n"
                    "  nvidia-agent stage --kernel 6.1.0-29-amd64 --wait 600\n\n"
                    "Exit 0: accepted (with --wait: staged). 1: refused, or with --wait missing or\n"
                    "failed (the reason is printed). 2: --wait ran out while still staging.\n"
                    "69: the daemon is not running (the driver is then installed at KERNEL's first boot).")
    st.add_argument("--kernel", required=True, metavar="K", help="the kernel release the next boot runs (uname -r)")
    st.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the driver to be staged (default: return once accepted)")
    _socket_argument(st)

    rb = sub.add_parser(
        "rollback", help="go back to the previous driver tree for the running kernel",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the running daemon to activate, instead of the configured driver, an earlier\n"
                    "tree for this OS and kernel: of those installed (other driver versions; not the\n"
                    "configured, the staged or a refused one), the newest (after an earlier rollback:\n"
                    "the newest installed before the pinned one). Its modules are\n"
                    "loaded (the running ones unloaded if nothing holds them), `current` and the\n"
                    "overlay switch to it. It holds until `nvidia-agent rollback --undo`, a new\n"
                    "configured driver, another OS version or kernel. Root only.\n\n"
                    "Exit 0: accepted (with --wait: the agent is ready on it). 1: nothing to roll back\n"
                    "to (the trees there are printed), or --wait saw it fail. 2: --wait ran out.\n"
                    "69: the daemon is not running.")
    rb.add_argument("--undo", action="store_true", help="back to the configured driver")
    rb.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the agent to be ready on it")
    _socket_argument(rb)

    im = sub.add_parser(
        "import", help="bring driver images in from an archive, for hosts without a registry",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import the images of PATH for this host's platform into " + IMAGES_DIR + ",\n"
                    "an OCI image layout kept until replaced or removed. The daemon uses an imported\n"
                    "image, with no network, whenever the reference it wants (image.registry,\n"
                    "image.repository, the rendered tag) is one of the names imported: for this boot,\n"
                    "and for staging the next OS's driver.\n\n"
                    "PATH is an oci-archive (skopeo copy ... oci-archive:FILE:TAG), a docker-archive\n"
                    "(docker save, gzipped or not) or an OCI image layout directory (skopeo copy ...\n"
                    "oci:DIR:TAG, umoci). Every blob is checked against its digest, every layer against\n"
                    "the config's diff_ids; a tampered archive is refused and nothing is kept. Images\n"
                    "for other platforms are left out. Names: whole references as the archive carries\n"
                    "them (docker's short forms as docker reads them), else a bare tag (what\n"
                    "oci-archive:FILE:TAG writes), which belongs to image.registry/image.repository;\n"
                    "--as REGISTRY/REPOSITORY:TAG names the archive's one image. A cosign signature\n"
                    "(REPOSITORY:sha256-<hex>.sig copied to an archive) imports the same way and\n"
                    "serves image.verify offline.\n\n"
                    "  nvidia-agent import driver-535-flatcar-3815.2.0.oci.tar\n"
                    "  nvidia-agent import --as registry.example/nvidia/driver:535.261.03-flatcar-3815.2.0 d.tar\n"
                    "  nvidia-agent import --list\n\n"
                    "Exit 0: imported (the names are printed). 1: refused (the reason is printed).\n"
                    "64: bad arguments. 78: bad configuration.")
    im.add_argument("path", nargs="?", type=Path, metavar="PATH", help="the archive or layout directory")
    im.add_argument("--as", dest="as_ref", metavar="REF", help="the name to keep the archive's one image under")
    im.add_argument("--list", action="store_true", help="list the imported images")
    im.add_argument("--remove", metavar="REF", help="forget an imported image (and the blobs only it used)")

    sub.add_parser("config", help="validate the configuration and print the merged result as JSON",
                   description="Exit 0 with the effective settings, or 78 naming the file, key and what is valid.")

    p = sub.add_parser(
        "preflight", help="check that a driver image for an OS version and kernel exists and verifies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Before rolling an OS release out to GPU nodes: resolve, pull and verify (digests, the\n"
                    "manifest's files, every module's vermagic against KERNEL) the image this host's\n"
                    "configuration would ask for after booting that OS and kernel, in a scratch directory\n"
                    "that is removed afterwards. Nothing on the host changes; no daemon is needed.\n\n"
                    "  nvidia-agent preflight --os-version 3815.2.1 --kernel 6.6.21-flatcar\n\n"
                    "Exit 0: the image exists and verifies. 1: it does not (missing, unreachable, or\n"
                    "rejected: the reason is printed). 64: a version or kernel that cannot name an\n"
                    "image. 78: bad configuration.")
    p.add_argument("--os-version", required=True, metavar="V", help="the OS version the node will boot "
                   "(VERSION_ID, or OSTREE_VERSION on Fedora/RHEL CoreOS)")
    p.add_argument("--kernel", required=True, metavar="K", help="the kernel release it will boot (uname -r)")
    p.add_argument("--os-id", metavar="ID", help="the OS id as the agent keys it (default: this host's; "
                   "Fedora CoreOS is fedora-coreos, from ID=fedora with VARIANT_ID=coreos)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), metavar="DIR",  # noqa: S108 - mkdtemp, 0700
                   help="where the scratch directory goes, under the host root (default /var/tmp): it "
                        "holds one driver image while it is checked")
    return parser


def _socket_argument(parser: argparse.ArgumentParser) -> None:
    """--socket, for the commands that talk to the running daemon."""
    parser.add_argument("--socket", type=Path, default=None, help=f"socket path (default <root>{SOCKET_FILE})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host = HostRoot(args.root.resolve())
    if args.command == "status":
        return cmd_status(host, args)
    if args.command == "stage":
        return cmd_stage(host, args)
    if args.command == "rollback":
        return cmd_rollback(host, args)
    # preflight prints its answer on stdout, for scripts: its progress goes to stderr
    log.configure(sys.stderr if args.command == "preflight" else None, verbose=getattr(args, "verbose", False))
    logger = structlog.get_logger("nvidia-agent")
    try:
        settings = load_settings(host)
    except ConfigError as exc:
        logger.error("config_invalid", error=str(exc), file=exc.file, key=exc.key)
        print(f"nvidia-agent: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.command == "config":
        print(json.dumps(asdict(settings), indent=2, default=list))
        return ExitCode.OK
    if args.command == "preflight":
        return cmd_preflight(host, settings, args)
    if args.command == "import":
        return cmd_import(host, settings, args)
    return cmd_daemon(host, settings, once=args.once)


def _registry_unset() -> ConfigError:
    return ConfigError("/etc/nvidia-agent/config.d/", "image.registry", "not set: the agent trusts no "
                       "registry it was not told about", 'e.g. [image] registry = "registry.example:5000" '
                       "in /etc/nvidia-agent/config.d/50-registry.toml")


def _registry_client(host: HostRoot, settings: Settings, cancel: Cancel) -> Callable[[], RegistryClient]:
    """What makes the registry client the configuration describes, on first use (TLS trust and requests cost
    an unchanged boot ~50 ms it never needs); ConfigError now for bad credentials or CAs."""
    logger = structlog.get_logger("nvidia-agent")
    credentials = Credentials.load(host(settings.image.auth_file))
    if settings.image.ca_file:
        from agent.trust import check_ca_file  # noqa: PLC0415

        check_ca_file(host, settings.image.ca_file)
    if credentials.unsupported_helpers:
        logger.warning("credential_entries_ignored", entries=",".join(credentials.unsupported_helpers),
                       file=settings.image.auth_file)

    def make() -> RegistryClient:
        from agent.fetch.registry import RegistryClient  # noqa: PLC0415
        from agent.trust import session_for, trust_context  # noqa: PLC0415

        return RegistryClient(plain_http=settings.image.plain_http, credentials=credentials,
                              timeout_s=settings.image.timeout_s, attempts=settings.image.attempts,
                              session=session_for(trust_context(host, settings.image.ca_file)), sleep=cancel.sleep)
    return make


def _trust(host: HostRoot, settings: Settings) -> Trust | None:
    """image.verify's public key, or None when signatures are not required."""
    verify = settings.image.verify
    if not verify.public_key:
        return None
    from agent.fetch.sources import load_trust  # noqa: PLC0415

    return load_trust(host(verify.public_key), verify.public_key, verify.match_repository)


def _image_name(text: str, option: str) -> Reference:
    """An image name for --as / --remove: a whole reference with a tag (docker's short forms read as docker
    reads them), never a digest: an imported image is found by its name."""
    ref = normalize(text)
    if ref.digest or text.rsplit("/", 1)[-1].find(":") < 0:
        raise ValueError(f"{option} {text!r}: name the image with a tag, REGISTRY/REPOSITORY:TAG (no digest)")
    return ref


def cmd_import(host: HostRoot, settings: Settings, args: argparse.Namespace) -> int:
    from agent.fetch.imported import ImageStore  # noqa: PLC0415

    store = ImageStore(host(IMAGES_DIR))
    if args.list:
        for e in store.entries():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.imported_at))
            print(f"{e.name}  {e.manifest.digest}  imported {when} from {e.source}")
        return ExitCode.OK
    try:
        as_ref = _image_name(args.as_ref, "--as") if args.as_ref else None
        remove = _image_name(args.remove, "--remove") if args.remove else None
    except ValueError as exc:
        print(f"nvidia-agent import: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if remove is not None:
        if not store.remove(remove):
            print(f"nvidia-agent import: no imported image named {remove}", file=sys.stderr)
            return ExitCode.FAILED
        print(f"removed {remove}")
        return ExitCode.OK
    if args.path is None:
        print("nvidia-agent import: name an archive or layout directory (or --list, --remove REF)", file=sys.stderr)
        return ExitCode.USAGE
    default = (Reference(settings.image.registry, settings.image.repository, tag="x")
               if settings.image.registry else None)
    try:
        named = store.import_path(args.path.absolute(), Platform.host(), default=default, as_ref=as_ref)
    except AgentError as exc:
        print(f"nvidia-agent import: {args.path}: refused: {exc.message}" + (f"\n  {exc.hint}" if exc.hint else ""),
              file=sys.stderr)
        return ExitCode.FAILED
    for ref, image in named:
        print(f"imported {ref} ({image.manifest.digest}, config {image.config_digest})")
    return ExitCode.OK


def cmd_preflight(host: HostRoot, settings: Settings, args: argparse.Namespace) -> int:
    from agent.fetch.engine import engine_for  # noqa: PLC0415
    from agent.fetch.imported import ImageStore  # noqa: PLC0415
    from agent.fetch.sources import sources_for  # noqa: PLC0415
    from agent.update.preflight import check_image  # noqa: PLC0415

    logger = structlog.get_logger("nvidia-agent")
    try:
        if not settings.image.registry:
            raise _registry_unset()
        registry = _registry_client(host, settings, Cancel())()
        trust = _trust(host, settings)
    except ConfigError as exc:
        logger.error("config_invalid", error=str(exc), key=exc.key)
        print(f"nvidia-agent: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        current = HostProbe(host).os()
        os_ = replace(current, id=args.os_id or current.id, version=args.os_version)
        target = target_for_boot(settings, os_, args.kernel, oci_arch(platform.machine()))
        imported = ImageStore(host(IMAGES_DIR))
        image = settings.image
        result = check_image(lambda cache: sources_for(
                                 registry, cache, mirrors=image.mirrors, imported=imported,
                                 engine=engine_for(image.source, host(image.engine_socket), cache, image.timeout_s),
                                 trust=trust),
                             target, platform=Platform.host(), lib64_allow=settings.install.lib64_allow,
                             workdir=host(str(args.workdir)),
                             on_phase=lambda name, ctx: logger.info(name, **ctx) if name != "installing" else None)
    except AgentError as exc:
        print(f"nvidia-agent: preflight failed for {args.os_version} / {args.kernel}: {exc.message}"
              + (f"\n  {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return ExitCode.FAILED
    except ValueError as exc:  # a kernel or version that cannot name an image (render_tag, os_key)
        print(f"nvidia-agent: preflight: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    modules = ", ".join(m.name for m in result.verified.modules)
    print(f"ok: {target.reference} ({result.marker.digest}) verifies for kernel {target.kernel}: {modules}")
    return ExitCode.OK


def cmd_daemon(host: HostRoot, settings: Settings, *, once: bool) -> int:
    logger = structlog.get_logger("nvidia-agent")
    if not settings.image.registry:
        problem = _registry_unset()
        logger.error("config_invalid", error=str(problem), key="image.registry")
        print(f"nvidia-agent: configuration error: {problem}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        lock = acquire_lock(host(LOCK_FILE))
    except LockHeld as exc:
        logger.error("already_running", error=str(exc))
        print(f"nvidia-agent: {exc}", file=sys.stderr)
        return ExitCode.LOCKED
    with lock:
        cancel = Cancel()
        try:
            registry = _registry_client(host, settings, cancel)
            trust = _trust(host, settings)
        except ConfigError as exc:
            logger.error("config_invalid", error=str(exc))
            print(f"nvidia-agent: configuration error: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
        agent = Agent(host, settings, probe=HostProbe(host), registry=registry, trust=trust,
                      udev_monitor=pci_monitor if host.root == Path("/") else None)
        code = run_daemon(agent, socket_path=host(SOCKET_FILE), once=once, triggers=Triggers.install(),
                          notifier=Notifier.from_env(), cancel=cancel)
    if any(t.name == "reconcile" for t in threading.enumerate()):
        # A pass still blocked in a socket or a subprocess: every step it could be in is safe to
        # cut (the crash tests kill the agent at each one), so do not wait for it.
        sys.stdout.flush()
        os._exit(code)
    return code


class _WaitLine:
    """While `status --wait` waits: on a terminal one live line (rewritten in place), else a plain line at most
    every PLAIN_EVERY_S when it changed; on stderr, so stdout stays the answer."""

    PLAIN_EVERY_S = 5.0

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.shown = ""
        self.at = 0.0

    def show(self, status: dict[str, Any]) -> None:
        progress = status.get("progress")
        text = f"{status.get('phase')}: {render_progress(progress)}" if progress else f"{status.get('phase')}"
        if self.live:
            sys.stderr.write("\r\033[K" + text[:200])
            sys.stderr.flush()
            self.shown = text
        elif text != self.shown and time.monotonic() - self.at >= self.PLAIN_EVERY_S:
            print(text, file=sys.stderr, flush=True)
            self.shown, self.at = text, time.monotonic()

    def end(self) -> None:
        if self.live and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_status(host: HostRoot, args: argparse.Namespace) -> int:
    path = args.socket or host(SOCKET_FILE)
    deadline = time.monotonic() + args.wait
    line = _WaitLine()
    while True:
        try:
            status = query(path)
            error = None
        except (OSError, ValueError) as exc:
            status, error = None, exc
        settled = status is not None and Phase(status["phase"]).exit_code == ExitCode.OK
        if settled or time.monotonic() >= deadline:
            break
        if status is not None:
            line.show(status)
        time.sleep(0.5)
    line.end()
    if status is None:
        print(f"nvidia-agent: daemon not reachable at {path}: {error}\n"
              "  is it running? systemctl status nvidia-agent", file=sys.stderr)
        return ExitCode.FAILED
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_events(status) if args.events else render_text(status))
    return int(Phase(status["phase"]).exit_code)


def cmd_stage(host: HostRoot, args: argparse.Namespace) -> int:
    path = args.socket or host(SOCKET_FILE)
    try:
        reply = ask(path, {"command": "stage", "kernel": args.kernel})
    except (OSError, ValueError) as exc:
        print(f"nvidia-agent: daemon not reachable at {path}: {exc}\n"
              f"  the driver for {args.kernel} will be installed at its first boot (network needed)", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    if not reply.get("ok"):
        print(f"nvidia-agent: stage {args.kernel}: {reply.get('error')}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"nvidia-agent: the next boot runs {args.kernel}: {reply.get('detail')}")
    deadline = time.monotonic() + args.wait
    while args.wait > 0:
        try:
            nxt = query(path).get("next_boot") or {}
        except (OSError, ValueError):
            nxt = {}
        fresh = nxt.get("kernel") == args.kernel and (nxt.get("at") or 0) >= (reply.get("at") or 0)
        state = nxt.get("state") if fresh else None  # a verdict from before this request says nothing
        if state in ("ready", "missing", "failed"):
            print(f"next boot: {state}: {nxt.get('os_key')}: {nxt.get('detail')}")
            return ExitCode.OK if state == "ready" else ExitCode.FAILED
        if time.monotonic() >= deadline:
            print(f"next boot: still {state or 'waiting'} after {args.wait:g}s", file=sys.stderr)
            return ExitCode.DEGRADED
        time.sleep(0.5)
    return ExitCode.OK


def cmd_rollback(host: HostRoot, args: argparse.Namespace) -> int:
    path = args.socket or host(SOCKET_FILE)
    try:
        reply = ask(path, {"command": "rollback", "undo": bool(args.undo)})
    except (OSError, ValueError) as exc:
        print(f"nvidia-agent: daemon not reachable at {path}: {exc}\n"
              "  is it running? systemctl status nvidia-agent", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    if not reply.get("ok"):
        print(f"nvidia-agent: rollback: {reply.get('error')}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"nvidia-agent: {reply.get('detail')}")
    deadline = time.monotonic() + args.wait
    while args.wait > 0:
        time.sleep(0.5)
        try:
            status = query(path)
        except (OSError, ValueError):
            status = {}
        if status.get("current") == reply.get("tree") and status.get("phase") == Phase.READY:
            print(f"ready: {status.get('detail')}")
            return ExitCode.OK
        after = (status.get("last_reconcile_at") or 0) > (reply.get("at") or 0)  # a pass since the request
        failed = status.get("phase") in (Phase.FAILED, Phase.DEGRADED) and status.get("current") != reply.get("tree")
        if after and failed:
            err = status.get("last_error") or {}
            print(f"nvidia-agent: rollback: {status.get('phase')}: {err.get('message')}", file=sys.stderr)
            return ExitCode.FAILED
        if time.monotonic() >= deadline:
            print(f"nvidia-agent: rollback: not ready on {reply.get('tree')} after {args.wait:g}s", file=sys.stderr)
            return ExitCode.DEGRADED
    return ExitCode.OK

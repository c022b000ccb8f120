"""Prometheus metrics (prometheus-client) of one agent, on a registry of their own.

Gauges follow the status snapshot (`observe`); counters and histograms are fed as things happen
(`passed`, `installed`). `render()` is the text exposition format node_exporter's textfile
collector and a scraper read. Names and help texts follow Prometheus' conventions: base units
(seconds, bytes), `_total` on counters, `_info` for labels that describe, not measure.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from agent.status import Phase, Snapshot

NEXT_BOOT_STATES = ("none", "staging", "ready", "missing", "failed")
PENDING_OBSERVATIONS = 256  # durations kept for a registry not built yet (one per install)
DURATION_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Metrics:
    """The agent's metrics; thread-safe (one lock around what is recorded and each render).

    prometheus-client is imported, and its registry built, at the first render: an unchanged boot
    on a host that neither scrapes nor collects textfiles never pays for it (~20 ms of imports).
    Until then what happens is kept in plain Python, bounded: the latest snapshot, each counter's
    total per label, and the histograms' observations (one per install, the oldest dropped past
    PENDING_OBSERVATIONS), applied to the registry when it is built.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started_at = time.time()
        self._success_at = 0.0
        self._snap: Snapshot | None = None
        self._totals: dict[tuple[str, str], float] = {}  # (counter, label value) -> what to add
        self._observed: deque[tuple[str, str, float]] = deque(maxlen=PENDING_OBSERVATIONS)  # (histogram, label, s)
        self._built: _Registry | None = None

    def observe(self, snap: Snapshot) -> None:
        """Set the gauges from the status snapshot (at the next render)."""
        with self._lock:
            if snap.last_ready_at and not self._success_at:  # an earlier process's, from the state file
                self._success_at = snap.last_ready_at
            self._snap = snap

    def passed(self, outcome: Phase, error_kind: str | None, at: float) -> None:
        """One pass ended: its outcome, its error's kind if it failed."""
        with self._lock:
            self._count("reconciles", outcome.value, 1)
            if error_kind:
                self._count("errors", error_kind, 1)
            if outcome in (Phase.READY, Phase.NO_GPU):
                self._success_at = at

    def installed(self, source: str, pull_s: float | None, install_s: float, pulled_bytes: int) -> None:
        """One image installed (or staged): how long it took, what came over the wire."""
        with self._lock:
            if pull_s is not None:
                self._observe("pull_seconds", source, pull_s)
            self._observe("install_seconds", "", install_s)
            if pulled_bytes:
                self._count("pulled_bytes", source, pulled_bytes)

    def _count(self, counter: str, label: str, amount: float) -> None:
        if self._built is not None:
            self._built.count(counter, label, amount)
        else:
            self._totals[counter, label] = self._totals.get((counter, label), 0.0) + amount

    def _observe(self, histogram: str, label: str, value: float) -> None:
        if self._built is not None:
            self._built.observe(histogram, label, value)
        else:
            self._observed.append((histogram, label, value))

    def render(self) -> bytes:
        """The text exposition format of every metric, as of now."""
        from prometheus_client import generate_latest  # noqa: PLC0415 - lazily: see the class

        with self._lock:
            if self._built is None:
                built = _Registry(self._started_at)
                for (counter, label), amount in self._totals.items():
                    built.count(counter, label, amount)
                for histogram, label, value in self._observed:
                    built.observe(histogram, label, value)
                self._totals.clear()
                self._observed.clear()
                self._built = built
            r = self._built
            if self._success_at:
                r.last_success.set(self._success_at)
            if self._snap is not None:
                r.follow(self._snap)
            return generate_latest(r.registry)


class _Registry:
    """The prometheus-client objects, on a registry of their own."""

    def __init__(self, started_at: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram  # noqa: PLC0415

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ready = Gauge("nvidia_agent_ready", "1 when this host's driver works for the running kernel (modules "
                           "at the tree's version, device nodes present; also while degraded but still serving a "
                           "working tree, and on a host with no GPU to serve), else 0.", registry=r)
        self.phase = Enum("nvidia_agent_phase", "What the agent is doing, or the outcome of its last pass.",
                          states=[p.value for p in Phase], registry=r)
        self.driver = Gauge("nvidia_agent_driver_info", "The driver tree this host runs, 1: its version, OS key, "
                            "kernel and image digest (absent while no tree is active).",
                            ["driver", "os_key", "kernel", "digest"], registry=r)
        self.next_boot = Enum("nvidia_agent_next_boot", "The driver for the OS or kernel an update staged for the "
                              "next boot: none (no update staged), staging, ready, missing or failed.",
                              states=list(NEXT_BOOT_STATES), registry=r)
        self.last_success = Gauge("nvidia_agent_last_success_timestamp_seconds", "When a pass last ended ready "
                                  "(or with no GPU to serve), as Unix time, across agent restarts; 0 before the "
                                  "first.", registry=r)
        self.reconciles = Counter("nvidia_agent_reconciles", "Passes, by their outcome phase.", ["outcome"],
                                  registry=r)
        self.errors = Counter("nvidia_agent_errors", "Failed passes, by the kind of error (its class: "
                              "RegistryUnavailable, ImageRejected, KernelMismatch, ...).", ["kind"], registry=r)
        self.pull_seconds = Histogram("nvidia_agent_pull_duration_seconds", "Time to bring an image's layers onto "
                                      "the host (download, export or read of an import; a download is extracted "
                                      "as it arrives, and this includes the extraction).", ["source"],
                                      buckets=DURATION_BUCKETS_S, registry=r)
        self.install_seconds = Histogram("nvidia_agent_install_duration_seconds", "Time from resolving an image to "
                                         "its tree renamed into place (pull, verify, unpack, sync).",
                                         buckets=DURATION_BUCKETS_S, registry=r)
        self.pulled_bytes = Counter("nvidia_agent_pulled_bytes", "Layer bytes fetched for installs that "
                                    "succeeded, by source (downloads: what was not in the content store yet; the "
                                    "engine: its export).", ["source"], registry=r)
        self.started = Gauge("nvidia_agent_start_time_seconds", "When this agent process started, as Unix time.",
                             registry=r)
        self.started.set(started_at)

    def count(self, counter: str, label: str, amount: float) -> None:
        metric = {"reconciles": self.reconciles, "errors": self.errors, "pulled_bytes": self.pulled_bytes}[counter]
        metric.labels(label).inc(amount)

    def observe(self, histogram: str, label: str, value: float) -> None:
        if histogram == "pull_seconds":
            self.pull_seconds.labels(label).observe(value)
        else:
            self.install_seconds.observe(value)

    def follow(self, snap: Snapshot) -> None:
        """The gauges as the snapshot says."""
        self.ready.set(1 if snap.phase in (Phase.READY, Phase.NO_GPU) or snap.serving is not None else 0)
        self.phase.state(snap.phase.value)
        driver = snap.active_driver
        self.driver.clear()
        if snap.current is not None and driver is not None and snap.phase is not Phase.NO_GPU:
            self.driver.labels(driver=driver, os_key=snap.os_key or "", kernel=snap.kernel or "",
                               digest=snap.digest or "").set(1)
        state = (snap.next_boot or {}).get("state", "none")
        self.next_boot.state(state if state in NEXT_BOOT_STATES else "none")


"""An image's layers, fetched in a thread while the install extracts them: download and inflate overlap.

`Layers` asks the source for each layer in order, in a thread of its own. The install reads
layer i with `follow(i)`: where the source streams the blob into `<blob>.partial` (a registry),
the reader follows that file as it grows, so extraction runs while the download does; where
it does not (the engine, an imported archive), the reader waits for the whole blob.

What a follower reads has not been verified when it is read. Two things make that safe: it
only ever reaches a private staging directory that nothing uses before the install commits,
and nothing commits until `complete()` returned, that is until the source itself checked every
blob (check_blob), and until each follower checked its own bytes against the descriptor (size
and sha256). A follower that saw anything else (the file cut short, a download started over,
bytes that do not match) raises `Unfollowable`, and the install extracts again from the
verified blobs. An error of the extraction itself while a followed layer's bytes are not proven
yet is not believed either: it is judged again on the verified blob (a byte flipped in transit is
a refetch, not a refused image).

A follower waiting for bytes polls no stop flag of the agent's: the pull thread does (the source
checks `cancelled` as it downloads, a stalled socket ends in its own timeouts), and a stop ends
the download, whose end wakes the follower. So a follower never feeds the hang detector's
heartbeat for a download that makes no progress. `abandon(i)` wakes a follower whose reader gave
up (the extraction failed on its own), without stopping the download.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from agent.errors import Cancelled
from agent.fetch.manifest import Descriptor, ResolvedImage
from agent.fetch.sources import ImageSource
from agent.fetch.store import PARTIAL

FOLLOW_POLL_S = 0.005  # a follower at the end of what was downloaded looks again this often
READ_BUFFER = 1 << 20


class Unfollowable(Exception):  # a signal to the install, not an error
    """What a follower read is not the blob: extract from the verified blob instead."""


class Layers:
    """The layers of `image`, fetched from `source` in order by a thread; use as a context manager."""

    def __init__(self, source: ImageSource, image: ResolvedImage, cancelled: Callable[[], bool]) -> None:
        self.source, self.image = source, image
        self._cancelled = cancelled
        self._stop = threading.Event()
        self._paths: list[Path | None] = [None] * len(image.layers)
        self._done = [threading.Event() for _ in image.layers]
        self._abandoned = [threading.Event() for _ in image.layers]
        self._unproven: set[int] = set()  # layers followed whose bytes were not checked (yet)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pull", daemon=True)

    def __enter__(self) -> Layers:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()  # a failed install stops the download where it is (its .partial is kept to resume)
        self._thread.join()

    def _run(self) -> None:
        try:
            for i, desc in enumerate(self.image.layers):
                self._paths[i] = self.source.layer(self.image, desc, self._should_stop)
                self._done[i].set()
        except BaseException as exc:  # the install raises it (complete(), or a follower)
            self._error = exc
        finally:
            for done in self._done:
                done.set()

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self._cancelled()

    def complete(self) -> None:
        """Return once every layer was fetched and checked by its source; raise what the fetch raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def verified(self, i: int) -> Path:
        """Layer i once its source has checked it (waiting for the pull thread, which watches the stop)."""
        self._done[i].wait()
        path = self._paths[i]
        if path is None:
            raise self._error or RuntimeError("a layer fetch ended without a result")
        return path

    def follow(self, i: int) -> IO[bytes]:
        """Layer i as a stream: followed while it downloads where the source allows, else read once fetched."""
        landing = self.source.landing(self.image, self.image.layers[i])
        if landing is None or self._done[i].is_set():
            return self.verified(i).open("rb", buffering=READ_BUFFER)
        return io.BufferedReader(_Follower(landing, self.image.layers[i], self, i), READ_BUFFER)

    @property
    def unproven(self) -> bool:
        """Whether a followed layer's bytes have not been checked: an error from them is no verdict yet."""
        return bool(self._unproven)

    def abandon(self, i: int) -> None:
        """The reader of layer i gave up: wake its follower (the download goes on)."""
        self._abandoned[i].set()

    def _finished(self, i: int) -> bool:
        return self._done[i].is_set()

    def _failure(self, i: int) -> BaseException | None:
        return self._error if self._paths[i] is None else None

    def _proven(self, i: int) -> None:
        self._unproven.discard(i)

    def _read_from(self, i: int) -> None:
        self._unproven.add(i)  # bytes not checked yet have reached the extraction


class _Follower(io.RawIOBase):
    """Reads `<landing>.partial` (or `landing` once renamed) while another thread writes it."""

    def __init__(self, landing: Path, desc: Descriptor, layers: Layers, index: int) -> None:
        super().__init__()
        self._landing, self._desc, self._layers, self._index = landing, desc, layers, index
        self._file: io.FileIO | None = None
        self._digest = hashlib.sha256()
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._layers._abandoned[self._index].is_set():
            raise Cancelled("install abandoned: its extraction failed")
        while True:
            done = self._layers._finished(self._index)  # before the read: a read after it sees every byte
            n = self._read_some(buffer)
            if n:
                return n
            if done:
                return self._end()
            if self._file is not None and os.fstat(self._file.fileno()).st_size < self._read:
                raise Unfollowable(f"{self._landing.name}: the download started over")
            if self._layers._abandoned[self._index].wait(FOLLOW_POLL_S):
                raise Cancelled("install abandoned: its extraction failed")

    def _read_some(self, buffer: bytearray | memoryview) -> int:
        if self._file is None:
            partial = self._landing.with_name(self._landing.name + PARTIAL)
            # a finished download is its final blob (a .partial beside it would be an older one's)
            for path in (self._landing, partial) if self._layers._finished(self._index) else (partial, self._landing):
                try:
                    self._file = io.FileIO(path, "rb")
                    break
                except FileNotFoundError:
                    continue
            else:
                return 0
        view = memoryview(buffer)
        n = self._file.readinto(view) or 0
        if n:
            if not self._read:
                self._layers._read_from(self._index)
            self._read += n
            if self._read > self._desc.size:
                raise Unfollowable(f"{self._landing.name}: more bytes than its descriptor gives")
            self._digest.update(view[:n])
        return n

    def _end(self) -> int:
        """The writer is done: its verdict first, then whether what was read here is the blob."""
        failure = self._layers._failure(self._index)
        if failure is not None:
            raise failure
        if self._read != self._desc.size or f"sha256:{self._digest.hexdigest()}" != self._desc.digest:
            raise Unfollowable(f"{self._landing.name}: what was read while it downloaded is not the blob")
        self._layers._proven(self._index)
        return 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()

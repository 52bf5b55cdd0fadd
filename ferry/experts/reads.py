"""Expert records read from the store's files into cache slots: one file per MoE layer opened for honest reads
(ferry.tiers.disk), reads on the reader pool (ferry.tiers.read_pool, demand reads before prefetches), and each
finished read checked (errno, short read, checksum at an expert's first read) and marked on its cache entry.
The forward's thread alone calls these methods; the pool's threads only fill slots."""
from __future__ import annotations

import os
import weakref
import zlib
from pathlib import Path

from ferry.errors import FerryError, ModelLoadError
from ferry.experts.cache import Entry, ExpertCache
from ferry.experts.layout import StoreIndex
from ferry.tiers.disk import DirectFile
from ferry.tiers.read_pool import Finished, read_pool


class ExpertReadError(FerryError):
    """An expert could not be read from the store (I/O error, truncated file, checksum mismatch)."""


class ExpertReads:
    def __init__(self, folder: Path, index: StoreIndex, cache: ExpertCache, allow_direct: bool,
                 num_threads: int) -> None:
        self.index, self.layout, self.cache = index, index.layout, cache
        self.num_threads = num_threads
        self.files: dict[int, DirectFile] = {}
        try:
            for layer in index.layer_files:
                self.files[layer] = self._open(folder, layer, allow_direct)
            self.pool = read_pool(num_threads)
        except BaseException:
            for f in self.files.values():  # no file descriptor outlives a failed start
                f.close()
            raise
        # reads dropped without close() still land before the cache slab can go, and the files are closed
        self.close = weakref.finalize(self, _close, self.pool, list(self.files.values()))
        self._loading: dict[int, Entry] = {}  # read ticket -> the entry it fills
        # experts whose record passed its checksum once: later reads skip it (at 1 GB/s a check costs a quarter of
        # the read's time in CPU, which the forward needs on a small machine); corruption at rest shows at first use
        self._verified: set[tuple[int, int]] = set()

    def _open(self, folder: Path, layer: int, allow_direct: bool) -> DirectFile:
        path = folder / self.index.layer_files[layer]
        try:
            f = DirectFile(path, allow_direct)
        except OSError as e:
            raise ModelLoadError(f"cannot open expert file {path} (layer {layer}): {e}") from None
        need = max(r.offset + self.layout.format_of(r).record_nbytes for r in self.index.experts[layer])
        if f.size < need:
            f.close()
            raise ModelLoadError(f"expert file {path} (layer {layer}) is truncated: {f.size} bytes, the index "
                                 f"needs {need}; convert the model again")
        return f

    @property
    def io_mode(self) -> str:
        return ",".join(sorted({f.mode for f in self.files.values()}))

    def submit(self, entry: Entry, demand: bool) -> None:
        """Read entry's expert into its slot (a demand read goes ahead of every queued prefetch)."""
        layer, expert = entry.key
        f = self.files[layer]
        rec = self.index.experts[layer][expert]
        nbytes = self.layout.format_of(rec).record_nbytes
        address = self.cache.address(entry.slot)
        entry.ticket = self.pool.submit(f.fd, address, nbytes, rec.offset, demand, f.mode == "fadvise")
        self._loading[entry.ticket] = entry

    def needed_now(self, entry: Entry) -> None:
        """entry's read, if still queued as a prefetch, goes ahead of the others."""
        if not entry.done:
            self.pool.prioritize(entry.ticket)

    def pending(self) -> int:
        """Reads queued or in flight."""
        return self.pool.pending()

    def collect(self) -> None:
        """Mark the reads finished by now."""
        self._mark(self.pool.reap())

    def wait(self, entry: Entry) -> None:
        """Until entry's read has finished (GIL released meanwhile)."""
        while not entry.done:
            self._mark(self.pool.wait(entry.ticket))

    def wait_any(self) -> None:
        """Until some read finishes; there must be one in flight."""
        if not self._loading:
            raise RuntimeError("waiting for a free expert slot with no read in flight: every slot is pinned")
        self._mark(self.pool.wait())

    def drain(self) -> None:
        """Until every read has finished."""
        while self._loading:
            self._mark(self.pool.wait())

    def _mark(self, finished: list[Finished]) -> None:
        """Mark finished reads done, or failed with an error naming the expert and the file."""
        for ticket, nbytes, error, seconds in finished:
            entry = self._loading.pop(ticket)
            f = self.files[entry.key[0]]
            f.stats.num_reads += 1
            f.stats.bytes_read += nbytes
            f.stats.read_seconds += seconds
            entry.done, entry.error = True, self._check(entry, f, nbytes, error)

    def _check(self, entry: Entry, f: DirectFile, nbytes: int, error: int) -> ExpertReadError | None:
        layer, expert = entry.key
        rec = self.index.experts[layer][expert]
        fmt = self.layout.format_of(rec)
        if error or nbytes < fmt.record_nbytes:
            why = os.strerror(error) if error else (f"the file is truncated: read {nbytes} of {fmt.record_nbytes} "
                                                    f"bytes at offset {rec.offset}")
            return ExpertReadError(f"cannot read expert {expert} of layer {layer} from {f.path}: {why}")
        if entry.key in self._verified:  # the file was checked at the expert's first read
            return None
        crc = zlib.crc32(memoryview(self.cache.slot(entry.slot).numpy())[:fmt.payload_nbytes])
        if crc != rec.crc32:
            return ExpertReadError(f"expert {expert} of layer {layer} in {f.path} (offset {rec.offset}) fails its "
                                   f"checksum (crc32 {crc:#010x}, index says {rec.crc32:#010x}): the file is corrupt")
        self._verified.add(entry.key)
        return None


def _close(pool, files: list[DirectFile]) -> None:
    pool.close()  # after the reads queued and in flight
    for f in files:
        f.close()

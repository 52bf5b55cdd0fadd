"""Honest disk reads: bytes come from the device, not from the page cache.

A file is opened with O_DIRECT where the filesystem allows it (buffer address, file offset and length
aligned to ALIGN); where it does not (tmpfs, some network filesystems), reads go through the page cache
and the range is dropped right after with posix_fadvise(DONTNEED), so a later read of it goes to the disk
again and a RAM budget on top of these reads means what it says. Every read is counted."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

ALIGN = 4096  # O_DIRECT alignment that every common block device accepts (logical block size <= 4096)


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass
class ReadStats:
    num_reads: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time inside the read calls (on the reader threads)


class DiskReadError(OSError):
    """A read failed or came back short; the message names the file and the range."""


class DirectFile:
    """One file opened for honest reads. mode is 'direct' (O_DIRECT) or 'fadvise' (page cache dropped after)."""

    def __init__(self, path: str | os.PathLike, allow_direct: bool = True) -> None:
        self.path = str(path)
        self.mode = "fadvise"
        self.fd = -1
        if allow_direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.mode = "direct"
            except OSError:  # EINVAL: the filesystem has no O_DIRECT; any other error shows up again below
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.stats = ReadStats()
        self._lock = threading.Lock()

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill buf (len(buf) bytes) from offset. In direct mode buf's address, offset and length must be ALIGNed."""
        want = len(buf)
        if offset + want > self.size:
            raise DiskReadError(f"{self.path} is truncated: reading [{offset}, {offset + want}) but the file has "
                                f"{self.size} bytes")
        t0 = time.perf_counter()
        done = 0
        try:
            while done < want:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise DiskReadError(f"{self.path}: read of [{offset}, {offset + want}) ended after {done} bytes")
                done += n
            if self.mode == "fadvise":
                os.posix_fadvise(self.fd, offset, want, os.POSIX_FADV_DONTNEED)
        except DiskReadError:
            raise
        except OSError as e:
            raise DiskReadError(f"{self.path}: reading [{offset}, {offset + want}) failed: {e}") from None
        with self._lock:
            self.stats.num_reads += 1
            self.stats.bytes_read += want
            self.stats.read_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


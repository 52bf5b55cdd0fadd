"""One native kernel (a C++ extension): built for the instruction-set level in force, used only where that level
reaches the kernel's minimum, with the reason it is unavailable when it is not.

Every kernel module (gemv, paged_attention, fused, read_pool) holds one ``NativeKernel`` and exposes
``available()`` and ``unavailable_reason()`` from it; its ops call ``ext()`` and take their own fallback on None.
Per-ISA variants slot in here: a kernel is compiled once per level (``cpu.compile_flags``: that level's
instructions, ``FERRY_ISA_LEVEL`` for ``#if``), so a source can hold an AVX-512, an AVX2 and a portable body and the
level in force (the CPU's, or ``FERRY_ISA``'s lower one) decides which is built and run, never a higher one."""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from ferry.ops import cpu
from ferry.ops.build import load_extension
from ferry.ops.cpu import Isa


class NativeKernel:
    """A C++ extension chosen per process for ``cpu.isa()``; loaded (compiled on a miss) on the first ``ext()``."""

    def __init__(self, name: str, sources: list[str], cflags: list[str], min_isa: Isa = Isa.PORTABLE,
                 on_load: Callable[[ModuleType, Isa], None] | None = None, vectorized: bool = True) -> None:
        self.name = name  # the extension's name, e.g. "ferry_gemv"
        self.sources = sources  # files next to this module
        self.cflags = cflags  # the level's own flags are added by the build
        self.min_isa = min_isa  # below it the kernel is never built or loaded: its module's fallback runs
        self._on_load = on_load  # configures a freshly loaded module for its level
        self.vectorized = vectorized  # False: no code that gains from wider vectors, one portable build serves all
        self._level: Isa | None = None  # the level the choice below was made for
        self._ext: ModuleType | None = None
        self._reason: str | None = None

    def ext(self) -> ModuleType | None:
        """The extension for the level in force, or None (its module falls back); builds it on first use."""
        level = cpu.isa()
        if level is not self._level:
            self._choose(level)
        return self._ext

    def loaded(self) -> ModuleType | None:
        """The extension if it was already chosen for the level in force; None without building (hot paths)."""
        return self._ext if self._level is cpu.isa() else None

    def chosen(self) -> bool:
        """True once ``ext()`` ran for the level in force (whatever its outcome)."""
        return self._level is cpu.isa()

    def available(self) -> bool:
        return self.ext() is not None

    def unavailable_reason(self) -> str | None:
        """Why the fallback runs (the level is too low, or the build failed); None when the kernel runs."""
        self.ext()
        return self._reason

    def _choose(self, level: Isa) -> None:
        ext, reason = None, None
        if level < self.min_isa:
            reason = f"{self.name} needs {self.min_isa.label}; this process runs at {cpu.describe()}"
        else:
            ext = load_extension(self.name, self.sources, self.cflags, level if self.vectorized else Isa.PORTABLE)
            if ext is None:
                reason = f"{self.name} could not be built for {level.label} (see the warning above)"
            elif self._on_load is not None:
                self._on_load(ext, level)
        self._ext, self._reason, self._level = ext, reason, level

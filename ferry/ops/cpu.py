"""The CPU's instruction-set level: detected once, lowered by ``FERRY_ISA``, and the compiler flags of each level.

Every native kernel is built for one ``Isa`` level (its build folder is keyed by it, see ``build.py``) and is used
only where the level in force reaches the kernel's minimum (see ``kernel.py``). The level in force is the CPU's own,
or a lower one named by the environment variable ``FERRY_ISA`` (``portable``, ``avx2``, ``avx512``,
``avx512_bf16``), so an AVX-512 machine can run and test the paths an AVX2 or older CPU takes. The override can
only lower the level: asking for more than the CPU has would be an illegal instruction, so it is refused with a
warning. This module is the only place that reads ``FERRY_ISA`` or the CPU's flags.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from enum import IntEnum
from pathlib import Path

log = logging.getLogger("ferry")

ENV = "FERRY_ISA"


class Isa(IntEnum):
    """Instruction-set levels, ordered: a kernel built for a level runs on every CPU at or above it."""

    PORTABLE = 0  # the compiler's default target: any CPU this Python runs on
    AVX2 = 1  # AVX2 + FMA + F16C (Haswell, Zen 1 and later)
    AVX512 = 2  # AVX-512 F/BW/VL/DQ (Skylake-SP, Zen 4)
    AVX512_BF16 = 3  # AVX-512 plus native bfloat16 dot products (Cooper Lake, Sapphire Rapids, Zen 4)

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Isa:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(i.label for i in cls)
            raise ValueError(f"{ENV}={text!r} is not an instruction-set level; use one of {names}") from None


# /proc/cpuinfo flags each level needs on top of the level below it.
_LEVEL_FLAGS = {
    Isa.AVX2: {"avx2", "fma", "f16c"},
    Isa.AVX512: {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    Isa.AVX512_BF16: {"avx512_bf16"},
}
# Compiler flags that let the compiler use a level's instructions anywhere in a translation unit. -mtune=native
# schedules for the build machine as -march=native did, and never adds an instruction the level lacks.
_LEVEL_CFLAGS = {
    Isa.AVX2: ["-mavx2", "-mfma", "-mf16c", "-mtune=native"],
    Isa.AVX512: ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    Isa.AVX512_BF16: ["-mavx512bf16"],
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo: x86's "flags", ARM's "Features" (empty where there is none: not
    Linux, or not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def level_of(flags: frozenset[str]) -> Isa:
    """The highest level whose flags (and every lower level's) are all in `flags`."""
    level = Isa.PORTABLE
    for isa in (Isa.AVX2, Isa.AVX512, Isa.AVX512_BF16):
        if not _LEVEL_FLAGS[isa] <= flags:
            break
        level = isa
    return level


@functools.cache
def detected() -> Isa:
    """This CPU's level: from its flags, else from torch's own dispatch level (which cannot tell bf16 apart)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Isa.PORTABLE
    flags = cpu_flags()
    if flags:
        return level_of(flags)
    import torch

    return {"AVX512": Isa.AVX512, "AVX2": Isa.AVX2}.get(torch.backends.cpu.get_cpu_capability(), Isa.PORTABLE)


@functools.cache
def isa() -> Isa:
    """The level in force for this process: the CPU's, or the lower one ``FERRY_ISA`` names.

    Read once (kernels are chosen once per process); a test that changes the variable calls ``isa.cache_clear()``.
    """
    cpu = detected()
    text = os.environ.get(ENV, "").strip()
    if not text:
        return cpu
    wanted = Isa.parse(text)
    if wanted > cpu:
        log.warning("ferry: %s=%s asks for more than this CPU has (%s); using %s", ENV, wanted.label, cpu.label,
                    cpu.label)
        return cpu
    return wanted


def overridden() -> bool:
    """True where ``FERRY_ISA`` lowers the level below the CPU's own."""
    return isa() < detected()


def compile_flags(level: Isa) -> list[str]:
    """Compiler flags for a build at `level`: its instructions enabled, and ``FERRY_ISA_LEVEL`` (0-3) defined so a
    source can choose code per level with ``#if``."""
    flags = [f"-DFERRY_ISA_LEVEL={int(level)}"]
    for lower in (Isa.AVX2, Isa.AVX512, Isa.AVX512_BF16):
        if lower <= level:
            flags += _LEVEL_CFLAGS[lower]
    return flags


def native_bf16() -> bool:
    """True where this process computes bfloat16 natively rather than by widening to float32: x86 at level
    avx512_bf16 (the CPU's, not lowered by ``FERRY_ISA``; every AMX-BF16 CPU has it too), or an ARM CPU whose
    /proc/cpuinfo lists bf16 (Armv8.6 BFMMLA/BFDOT: Neoverse V1/N2, Graviton 3, Apple M2)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in cpu_flags()
    return isa() >= Isa.AVX512_BF16


def describe() -> str:
    """One line for logs and bench records: the level in force, and where it comes from."""
    if overridden():
        return f"{isa().label} ({ENV}; the CPU has {detected().label})"
    return isa().label


@functools.cache
def model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's guess): for records and caches keyed by machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""`python -m ferry.ops`: build (or find in the cache) every CPU kernel for this machine's instruction-set level,
and say which run and which fall back. `make install` runs it, so neither the first engine start nor the first
test waits minutes on a compile."""
from __future__ import annotations

import sys
import time

from ferry.ops import cpu, warm_up


def main() -> int:
    start = time.perf_counter()
    print(f"ferry: building CPU kernels for {cpu.describe()} (cached after the first time) ...", flush=True)
    reasons = warm_up()
    for name, reason in reasons.items():
        print(f"  {name}: {'runs' if reason is None else 'falls back: ' + reason}")
    print(f"ferry: kernels ready in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

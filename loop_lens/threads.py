"""A sane torch thread count for loop_lens's own entry points (the CLI, the test suite).

torch starts one intra-op thread per core. The small models loop_lens is often used with (the zoo's,
d_model 64) run thousands of tiny ops per forward; on a machine whose cores are busy with other work,
threads that wait on each other made them ~100x slower than one thread on a loaded 2-core machine.
So the CLI uses half the cores this process may run on (1 on a 2-core machine) unless the user
says otherwise with `OMP_NUM_THREADS` or `LOOP_LENS_THREADS`. Library calls never change the
thread count: in your own scripts, call `torch.set_num_threads(1)` for the tiny models.
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def sane_threads() -> int:
    """`LOOP_LENS_THREADS`, else `OMP_NUM_THREADS`, else half the available cores (at least 1)."""
    for var in ("LOOP_LENS_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not a thread count (a positive integer)") from None
            if n < 1:
                raise ValueError(f"{var}={value!r} is not a thread count (a positive integer)")
            return n
    return max(1, available_cores() // 2)


def configure() -> int:
    """Apply `sane_threads()`: through OMP_NUM_THREADS before torch is imported, else
    `torch.set_num_threads`. Returns the count."""
    n = sane_threads()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n

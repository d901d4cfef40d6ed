"""Process-wide settings the command line may give the worker processes it starts.

The library never changes process-wide settings; ``botmsg``, which owns its
processes, may set these in the environment of the worker processes it starts
(they act at ``exec``: glibc reads ``GLIBC_TUNABLES`` once, at start-up).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MALLOC_TUNABLES"]

#: glibc malloc tunables for a bulk-sending process (the ``GLIBC_TUNABLES`` value).
#:
#: asyncio's selector transport reads every answer with ``sock.recv(256 KiB)``:
#: glibc serves a block that large with ``mmap`` and returns it with
#: ``munmap`` at once (its default mmap threshold is 128 KiB), so every read
#: maps and unmaps 256 KiB and faults its pages in again (seen with strace,
#: in a raw aiohttp loop as in the SDK). With the mmap threshold at 1 MiB and
#: the trim threshold at 8 MiB the buffer comes from the heap and stays there.
#: uvloop reads into a buffer of its own and gains nothing from this.
#: Measured by ``python -m benchmarks --scenario malloc`` (same-run medians of
#: 5 alternated runs, 20,000 messages each, default loop; 2026-11-27, three
#: harness runs on a shared 2-CPU machine, load average 2.6-4.7): CPU per
#: message of send_many x0.88 (runs: 0.77, 0.88, 0.94), of a raw aiohttp loop
#: x0.87 (0.86-0.89). Issue #17's trial measured -11% for the SDK.
MALLOC_TUNABLES: Final = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=8388608"

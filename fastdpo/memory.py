"""Peak memory of a block of code, on CUDA or the CPU: `PeakMemoryMeter` and glibc knobs.

The op demo (`fastdpo demo --op`) and the benchmarks in `benchmarks/` measure with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from pathlib import Path

import torch


def _proc_status_bytes(field: str) -> int:
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1)) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss, which Linux
    carries over from the parent across fork + exec, it counts this program only."""
    return _proc_status_bytes("VmHWM")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt(parameter: int, value: int) -> None:
    """Sets a glibc malloc parameter; no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(ctypes.c_int(parameter), ctypes.c_int(value))


def limit_malloc_retention() -> None:
    """Makes glibc hand blocks over 64 KiB back to the OS at once, so RSS tracks live tensors.

    glibc raises its mmap threshold (up to 32 MiB) after large blocks are freed and then serves
    later blocks from its heap, which it keeps: a measured call could reuse pages that an earlier
    call left resident and look smaller than it is. A fixed 64 KiB threshold stops that, at the
    price of a page fault per fresh page (use `cache_malloc_blocks` before timing).
    """
    _mallopt(_M_MMAP_THRESHOLD, 64 * 2**10)


def cache_malloc_blocks() -> None:
    """Undoes `limit_malloc_retention` for timing: the state glibc reaches by itself once
    32 MiB blocks have been freed (blocks below 32 MiB reused from its heap, not re-faulted)."""
    _mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    _mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


class PeakMemoryMeter:
    """Context manager: bytes the enclosed code adds at its peak over what was resident before.

    CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes on entry. CPU: the
    kernel's peak-RSS counter (VmHWM), reset on entry through /proc/self/clear_refs, minus VmRSS
    on entry; call `limit_malloc_retention()` once before measuring. Linux only on the CPU.

        with PeakMemoryMeter(device) as meter:
            work()
        meter.peak_bytes
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._base = 0

    def __enter__(self) -> PeakMemoryMeter:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = _proc_status_bytes("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS
            except OSError as error:
                raise RuntimeError(
                    f"cannot reset the peak-RSS counter ({error}): CPU peak memory needs Linux's "
                    "/proc/self/clear_refs"
                ) from error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        self.peak_bytes = max(0, peak - self._base)

"""32-bit flags in host memory that a device stream sets and waits on, in stream order, without the host.

The hybrid miss service hands each layer's CPU job over through two words of a pinned mailbox
(cpu_experts.ExpertServer): the GPU stream sets `ready` once the split kernel has written the job and later
waits for `done` before adding the CPU's sum. On CUDA these are the driver's stream memory operations
(`cuStreamWriteValue32` with its default memory barrier, so the kernel's earlier writes are visible to the CPU
first; `cuStreamWaitValue32`), which need no host thread and are captured into CUDA graphs as nodes. On a CPU
device every op before them has already run, so a store and a blocking wait do the same.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import torch

_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ: wrap-safe, and each flag only ever holds 0 or 1


class StreamSignalsUnavailable(RuntimeError):
    """This driver cannot run stream memory operations; the message says what failed."""


class StreamSignals(Protocol):
    def write(self, addr: int, value: int) -> None: ...

    def wait_eq(self, addr: int, value: int) -> None: ...


class CudaStreamSignals:
    """Flags set and awaited by the current CUDA stream of `device` (libcuda through ctypes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        try:
            cu = ctypes.CDLL("libcuda.so.1")
            self._write, self._wait = cu.cuStreamWriteValue32_v2, cu.cuStreamWaitValue32_v2
        except (OSError, AttributeError) as e:
            raise StreamSignalsUnavailable(
                f"libcuda.so.1 without stream memory operations (CUDA >= 11.7): {e}"
            ) from None
        for f in (self._write, self._wait):
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            f.restype = ctypes.c_int
        # A probe on a scratch word: drivers that refuse memory operations say so here, not mid-step.
        self._probe = torch.zeros(16, dtype=torch.int32, pin_memory=True)
        with torch.cuda.device(device):
            self.write(self._probe.data_ptr(), 1)
            self.wait_eq(self._probe.data_ptr(), 1)
            torch.cuda.current_stream(device).synchronize()
        if int(self._probe[0]) != 1:
            raise StreamSignalsUnavailable("cuStreamWriteValue32 returned success but did not write host memory")

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def write(self, addr: int, value: int) -> None:
        rc = self._write(self._stream(), addr, value, 0)
        if rc != 0:
            raise StreamSignalsUnavailable(f"cuStreamWriteValue32 failed with CUresult {rc}")

    def wait_eq(self, addr: int, value: int) -> None:
        rc = self._wait(self._stream(), addr, value, _WAIT_EQ)
        if rc != 0:
            raise StreamSignalsUnavailable(f"cuStreamWaitValue32 failed with CUresult {rc}")


class WaitFn(Protocol):
    def __call__(self, addr: int, value: int, timeout_s: float) -> int: ...


class HostSignals:
    """The CPU device's version: the step's ops ran synchronously before a write, so a store keeps the order."""

    def __init__(self, wait: WaitFn, timeout_s: float = 60.0) -> None:
        self._wait_fn, self.timeout_s = wait, timeout_s

    def write(self, addr: int, value: int) -> None:
        ctypes.c_uint32.from_address(addr).value = value

    def wait_eq(self, addr: int, value: int) -> None:
        if self._wait_fn(addr, value, self.timeout_s) != 0:
            raise TimeoutError(f"no answer on the host flag at {addr:#x} within {self.timeout_s} s")

"""Routed experts computed on the host CPU, straight from the host store's FP8, int4 (or bf16) slabs.

The kernel is C (cpu_experts.c beside this file: the expert math, the expert server thread, a host-read
probe), built on first use as a setuptools extension with `-O3 -march=native -fopenmp` (plus
`$MOED_CPU_CFLAGS`) into a cache folder keyed on the source, the flags, this CPU's instruction-set flags and
the compiler's version, so a cache shared between hosts never loads a build for another CPU. It is loaded with
ctypes (calls release the GIL), and its structs' field names, offsets and sizes are checked against the
ctypes mirrors here at load. Without a C compiler `CpuExpertKernel` raises CpuKernelUnavailable and the
runner serves misses by copies where allowed. Why this kernel and not an int8 one: docs/benchmarks.md.
int4 experts are read in place with int8 activations (VNNI dot products where the CPU has them; cpu_experts.c says
how), or with `exact=True` by an fp32 path, the yardstick of the int8 path's error.

Layout read (per expert, from host_store.py): w13 [2N, K] (gate rows, then up rows), w2 [K, N],
w13_scale [2N/bn, ceil(K/bk)], w2_scale [ceil(K/bn), N/bk] fp32; int4: w13 uint8 [2N, K/2], w2 uint8 [K, N/2],
bf16 scales [2N, G13] / [K, G2], zero points int32 [2N/8, G13] / [K/8, G2].
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moed.formats.fp8 import dequantize_block_fp8
from moed.formats.int4 import Int4Weight, dequantize_int4
from moed.offload.host_store import ExpertLayout

log = logging.getLogger(__name__)

_lib_lock = threading.Lock()
_libs: dict[tuple[str, ...], ctypes.CDLL] = {}  # extra compiler flags -> the loaded build
FORMATS = {"bf16": 0, "fp8": 1, "int4": 2}  # job_t.fmt

_P = ctypes.c_void_p


class _Job(ctypes.Structure):
    """Mirror of the C `job_t` (check_layout compares the two at load)."""

    _fields_ = [
        ("n", ctypes.c_int),
        ("w13", ctypes.POINTER(_P)),
        ("s13", ctypes.POINTER(_P)),
        ("w2", ctypes.POINTER(_P)),
        ("s2", ctypes.POINTER(_P)),
        ("z13", ctypes.POINTER(_P)),
        ("z2", ctypes.POINTER(_P)),
        ("x", ctypes.POINTER(_P)),
        ("M", ctypes.POINTER(ctypes.c_int)),
        ("gu", ctypes.POINTER(_P)),
        ("h", ctypes.POINTER(_P)),
        ("y", ctypes.POINTER(_P)),
        ("c0", ctypes.POINTER(ctypes.c_int)),
        ("K", ctypes.c_int),
        ("N", ctypes.c_int),
        ("bn", ctypes.c_int),
        ("bk", ctypes.c_int),
        ("fmt", ctypes.c_int),
        ("group", ctypes.c_int),
        ("exact", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("q", _P),
        ("q_bytes", ctypes.c_int64),
        ("R", ctypes.c_int),
        ("M_out", ctypes.c_int),
        ("tok", _P),
        ("w", _P),
        ("out", _P),
        ("seconds", ctypes.c_double),
    ]


class _ServerCfg(ctypes.Structure):
    """Mirror of the C `server_cfg_t` (check_layout compares the two at load)."""

    _fields_ = [
        ("ready", _P),
        ("done", _P),
        ("hdr", _P),
        ("experts", _P),
        ("ids", _P),
        ("w", _P),
        ("x", _P),
        ("out", _P),
        ("R_max", ctypes.c_int),
        ("M_max", ctypes.c_int),
        ("E", ctypes.c_int),
        ("L", ctypes.c_int),
        ("w13", ctypes.POINTER(_P)),
        ("s13", ctypes.POINTER(_P)),
        ("w2", ctypes.POINTER(_P)),
        ("s2", ctypes.POINTER(_P)),
        ("z13", ctypes.POINTER(_P)),
        ("z2", ctypes.POINTER(_P)),
        ("st13", ctypes.c_int64),
        ("sts13", ctypes.c_int64),
        ("st2", ctypes.c_int64),
        ("sts2", ctypes.c_int64),
        ("stz13", ctypes.c_int64),
        ("stz2", ctypes.c_int64),
        ("K", ctypes.c_int),
        ("N", ctypes.c_int),
        ("bn", ctypes.c_int),
        ("bk", ctypes.c_int),
        ("fmt", ctypes.c_int),
        ("group", ctypes.c_int),
        ("exact", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("xr", _P),
        ("gu", _P),
        ("hbuf", _P),
        ("y", _P),
        ("tok", _P),
        ("wr", _P),
        ("q", _P),
        ("q_bytes", ctypes.c_int64),
        ("spin_s", ctypes.c_double),
        ("layer_stats", _P),
        ("log", _P),
        ("log_cap", ctypes.c_int64),
        ("log_n", _P),
        ("errors", _P),
    ]


class CpuKernelUnavailable(RuntimeError):
    """The CPU expert kernel could not be built here; the message says why."""


class CpuKernelLayoutError(RuntimeError):
    """A ctypes mirror disagrees with its C struct: a bug in this package, never a user error."""


SOURCE = Path(__file__).with_name("cpu_experts.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def compiler() -> list[str]:
    """The C compiler command setuptools builds with ($CC, else the one Python was built with)."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def cpu_flags() -> str:
    """This CPU's instruction-set flags (/proc/cpuinfo), which a -march=native build depends on."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    return os.uname().machine


def build_key(source: bytes, flags: list[str], cpu: str, compiler_version: str) -> str:
    """The cache key of a build: anything that changes the machine code changes it."""
    parts = [hashlib.sha256(source).hexdigest(), *flags, cpu, compiler_version, os.uname().machine]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _compile(out_dir: Path, flags: list[str]) -> Path:
    """Build the shared library into `out_dir` as a setuptools extension; its path."""
    from setuptools import Distribution, Extension

    ext = Extension(
        "moed_cpu_experts",
        sources=[str(SOURCE)],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        libraries=["m"],
    )
    cmd = Distribution({"name": "moed-cpu-experts", "ext_modules": [ext]}).get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(out_dir), str(out_dir / "obj")
    cmd.ensure_finalized()
    cmd.run()
    return Path(cmd.get_ext_fullpath("moed_cpu_experts"))


def _build(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernel library built with CFLAGS, $MOED_CPU_CFLAGS and `extra_flags` (tests build a scalar twin with
    -mno-avx512f), loaded once per flag set."""
    with _lib_lock:
        if extra_flags in _libs:
            return _libs[extra_flags]
        flags = CFLAGS + os.environ.get("MOED_CPU_CFLAGS", "").split() + list(extra_flags)  # e.g. -march=...
        cc = compiler()
        try:
            version = subprocess.run(
                [cc[0], "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            raise CpuKernelUnavailable(
                f"no C compiler ({cc[0]}) to build the CPU expert kernel; install gcc or leave CPU experts off"
            ) from None
        key = build_key(SOURCE.read_bytes(), flags, cpu_flags(), version)
        cache = Path(os.environ.get("MOED_CACHE", Path(tempfile.gettempdir()) / f"moed-{os.getuid()}")) / "build"
        so = cache / f"cpu_experts-{key}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"cpu_experts-{key}.", dir=cache))
            try:
                built = _compile(tmp, flags)
                os.replace(built, so)  # atomic: a concurrent builder's copy is as good
            except ImportError:
                raise CpuKernelUnavailable("setuptools is needed to build the CPU expert kernel") from None
            except Exception as e:  # setuptools' CompileError / LinkError; the compiler's output is above
                raise CpuKernelUnavailable(
                    f"building the CPU expert kernel ({SOURCE}, {' '.join(cc)} {' '.join(flags)}) failed: {e}"
                ) from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        lib = ctypes.CDLL(str(so))
        lib.struct_layout.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64)]
        lib.struct_layout.restype = ctypes.POINTER(_Field)
        check_layout(lib, 0, _Job)
        check_layout(lib, 1, _ServerCfg)
        job_p = ctypes.POINTER(_Job)
        lib.experts_run.argtypes, lib.experts_run.restype = [job_p], None
        lib.server_new.argtypes, lib.server_new.restype = [ctypes.POINTER(_ServerCfg)], _P
        lib.server_free.argtypes, lib.server_free.restype = [_P], None
        lib.wait_u32.argtypes, lib.wait_u32.restype = [_P, ctypes.c_uint32, ctypes.c_double], ctypes.c_int
        lib.read_bytes.argtypes, lib.read_bytes.restype = [_P, ctypes.c_size_t, ctypes.c_int], ctypes.c_double
        lib.int4_scratch_bytes.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.int4_scratch_bytes.restype = ctypes.c_int64
        _libs[extra_flags] = lib
        return lib


SECTION_NAMES = ("w13", "w13_scale", "w2", "w2_scale", "w13_zeros", "w2_zeros")  # job_t's weight pointer order


class _Field(ctypes.Structure):
    """The C `field_t`: one struct member's name and offset (struct_layout's answer)."""

    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_int64)]


def check_layout(lib: ctypes.CDLL, which: int, mirror: type[ctypes.Structure]) -> None:
    """Raise CpuKernelLayoutError unless `mirror` has the C struct's fields, in order, at its offsets, and its size."""
    n, size = ctypes.c_int(), ctypes.c_int64()
    fields = lib.struct_layout(which, ctypes.byref(n), ctypes.byref(size))
    c_side = [(fields[i].name.decode(), fields[i].offset) for i in range(n.value)]
    py_side = [(name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
    if c_side != py_side or size.value != ctypes.sizeof(mirror):
        diff = [(c, p) for c, p in zip(c_side, py_side) if c != p][:3]
        raise CpuKernelLayoutError(
            f"ctypes {mirror.__name__} ({ctypes.sizeof(mirror)} bytes, {len(py_side)} fields) "
            f"does not match its C struct in {SOURCE.name} ({size.value} bytes, "
            f"{len(c_side)} fields); first differing (C, ctypes) fields: {diff}"
        )


def _ptrs(values: list[int]) -> ctypes.Array:
    return (_P * len(values))(*values)


class CpuExpertKernel:
    """Computes routed experts on the CPU from host-store views; releases the GIL while it runs.

    `forward_many` computes on the calling thread's OpenMP team; `serve` starts an `ExpertServer`, a thread of the
    library's own that computes the jobs a GPU posts in a host mailbox (the hybrid miss service). int4 experts are
    computed with int8 activations unless `exact`; `cflags` adds compiler flags to this kernel's build."""

    def __init__(
        self, layout: ExpertLayout, threads: int = 0, exact: bool = False, cflags: tuple[str, ...] = ()
    ) -> None:
        # 0: every core this process may run on but one, which the runner's thread keeps to queue GPU work while
        # a job runs (a hybrid batch-1 layer on the lent 16-core host: 3.85 ms with 15 threads, 4.10 with 16).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.layout, self.threads, self.exact = layout, threads or max(1, cores - 1), exact
        self.lib = _build(tuple(cflags))

    def scratch_bytes(self, rows: int) -> int:
        """Bytes of int8 activation scratch a job of `rows` expert rows needs (0 unless int4)."""
        L = self.layout
        return int(self.lib.int4_scratch_bytes(rows, L.hidden, L.inter)) if L.is_int4 else 0

    def _job(
        self, n: int, ptrs: dict[str, list[int]], M: list[int], col0: list[int], q: torch.Tensor | None
    ) -> tuple[_Job, tuple]:
        L = self.layout
        bn, bk = L.block or (1, 1)
        names = (*SECTION_NAMES, "x")
        arrays = (
            *(_ptrs(ptrs[k]) for k in names),
            (ctypes.c_int * n)(*M),
            _ptrs(ptrs["gu"]),
            _ptrs(ptrs["h"]),
            _ptrs(ptrs["y"]),
            (ctypes.c_int * n)(*col0),
        )
        job = _Job(
            n,
            *arrays,
            L.hidden,
            L.inter,
            bn,
            bk,
            FORMATS[L.format],
            L.group or 0,
            int(self.exact),
            self.threads,
            0 if q is None else q.data_ptr(),
            0 if q is None else q.numel(),
            0,
            0,
            None,
            None,
            None,
            0.0,
        )
        return job, arrays

    def forward(self, expert: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """expert: one expert's section views (host, see module doc); x: [M, K] fp32 -> y [M, K] fp32."""
        return self.forward_many([expert], [x])[0]

    def forward_many(
        self, experts: list[dict[str, torch.Tensor]], xs: list[torch.Tensor], col0: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Several experts in one parallel region: experts[i] applied to xs[i] ([M_i, K] fp32) -> [M_i, K] fp32.
        col0[i] (default 0): expert i computes only its intermediate columns [col0[i], N) (a multiple of
        `column_granule(layout)`), its part of a column split whose other part a GPU computes."""
        L = self.layout
        n = len(experts)
        if n != len(xs) or not 0 < n <= 256:
            raise ValueError(f"forward_many takes 1..256 experts with one input each, got {n} and {len(xs)}")
        col0 = list(col0) if col0 is not None else [0] * n
        g = column_granule(L)
        if len(col0) != n or any(not 0 <= c < L.inter or c % g for c in col0):
            raise ValueError(f"forward_many: column starts {col0} must be multiples of {g} in [0, {L.inter}), one each")
        for x in xs:
            if (
                x.dim() != 2
                or x.shape[1] != L.hidden
                or x.dtype != torch.float32
                or not x.is_contiguous()
                or x.device.type != "cpu"
            ):
                raise ValueError(
                    f"CPU experts take contiguous fp32 host activations [M, {L.hidden}], got "
                    f"{x.dtype}{list(x.shape)} on {x.device}"
                )
        K, N = L.hidden, L.inter
        ys = [torch.empty(x.shape[0], K, dtype=torch.float32) for x in xs]
        gus = [torch.empty(x.shape[0], 2 * N, dtype=torch.float32) for x in xs]
        hs = [torch.empty(x.shape[0], N, dtype=torch.float32) for x in xs]
        rows = sum(x.shape[0] for x in xs)
        q = torch.empty(self.scratch_bytes(rows), dtype=torch.uint8) if L.is_int4 else None

        def ptr(t: torch.Tensor | None) -> int:
            return t.data_ptr() if t is not None else 0

        ptrs = {name: [ptr(e.get(name)) for e in experts] for name in SECTION_NAMES}
        ptrs.update(
            x=[x.data_ptr() for x in xs], gu=[ptr(t) for t in gus], h=[ptr(t) for t in hs], y=[ptr(t) for t in ys]
        )
        job, _arrays = self._job(n, ptrs, [x.shape[0] for x in xs], col0, q)
        self.lib.experts_run(ctypes.byref(job))
        return ys

    def serve(
        self, sections: list[dict[str, torch.Tensor]], max_tokens: int, k: int, pin: bool, spin_s: float = 0.05
    ) -> ExpertServer:
        """Start a server thread computing the jobs a GPU posts for layers `sections[i]` (HostExpertStore.sections
        views, one dict per layer index i) in steps of up to `max_tokens` tokens with k routes each."""
        return ExpertServer(self, sections, max_tokens, k, pin, spin_s)


class ExpertServer:
    """The CPU's side of the hybrid miss service (C thread `server_main`): one mailbox in host memory, pinned when a
    GPU posts into it. Word layout of `words` (int32): ready [0], done [16] (their own cache lines), header [32:39]
    (layer index, n_cpu, n_miss, M, R, k, split column: 0, or where the last CPU expert's columns start), then
    experts [R_max], ids [R_max], w [R_max] (fp32), x [M_max, K] and out [M_max, K] (fp32, 64-byte aligned). Jobs
    come from `kernels.miss_split.split_misses` plus a stream write of ready = 1; the answer is done = 1 and `out`,
    the CPU routes' weighted sum per token."""

    HEADER = 7
    LOG_CAP = 1024

    def __init__(
        self,
        kernel: CpuExpertKernel,
        sections: list[dict[str, torch.Tensor]],
        max_tokens: int,
        k: int,
        pin: bool,
        spin_s: float,
    ) -> None:
        L = kernel.layout
        K, N = L.hidden, L.inter
        if not sections or max_tokens < 1 or k < 1:
            raise ValueError(
                f"expert server: needs >= 1 layer, max_tokens >= 1 and k >= 1, got {len(sections)}, {max_tokens}, {k}"
            )
        self.kernel, self.layout, self.k, self.max_tokens = kernel, L, k, max_tokens
        R = self.R_max = max_tokens * k
        arrays = 3 * R
        x0 = -(-(48 + arrays) // 16) * 16  # x starts on a 64-byte line
        self._x0, self._out0 = x0, x0 + max_tokens * K
        self.words = torch.zeros(self._out0 + max_tokens * K, dtype=torch.int32, pin_memory=pin)
        w = self.words
        self.header = w[32 : 32 + self.HEADER]
        self.experts, self.ids = w[48 : 48 + R], w[48 + R : 48 + 2 * R]
        self.w = w[48 + 2 * R : 48 + 3 * R].view(torch.float32)
        self.x = w[x0 : self._out0].view(torch.float32).view(max_tokens, K)
        self.out = w[self._out0 :].view(torch.float32).view(max_tokens, K)
        self.ready_addr, self.done_addr = w.data_ptr(), w.data_ptr() + 16 * 4
        f32 = dict(dtype=torch.float32)
        self._scratch = [
            torch.empty(R, K, **f32),
            torch.empty(R, 2 * N, **f32),
            torch.empty(R, N, **f32),
            torch.empty(R, K, **f32),
            torch.empty(R, dtype=torch.int64),
            torch.empty(R, **f32),
        ]
        self._q = torch.empty(max(kernel.scratch_bytes(R), 1), dtype=torch.uint8)  # int4's int8 activations
        self.layer_stats = np.zeros((len(sections), 4))
        self.log = np.zeros((self.LOG_CAP, 8))
        self._counters = np.zeros(2, dtype=np.int64)  # log_n, errors
        self._read = 0

        def bases(name: str) -> ctypes.Array:
            return _ptrs([sec[name].data_ptr() if name in sec else 0 for sec in sections])

        def stride(name: str) -> int:
            t = sections[0].get(name)
            return 0 if t is None else t[0].numel() * t.element_size()

        self._bases = [bases(n) for n in SECTION_NAMES]
        bn, bk = L.block or (1, 1)
        cnt = self._counters.ctypes.data
        self._cfg = _ServerCfg(
            self.ready_addr,
            self.done_addr,
            self.header.data_ptr(),
            self.experts.data_ptr(),
            self.ids.data_ptr(),
            self.w.data_ptr(),
            self.x.data_ptr(),
            self.out.data_ptr(),
            R,
            max_tokens,
            L.num_experts,
            len(sections),
            *self._bases,
            *(stride(n) for n in SECTION_NAMES),
            K,
            N,
            bn,
            bk,
            FORMATS[L.format],
            L.group or 0,
            int(kernel.exact),
            kernel.threads,
            *(t.data_ptr() for t in self._scratch),
            self._q.data_ptr(),
            self._q.numel() if L.is_int4 else 0,
            spin_s,
            self.layer_stats.ctypes.data,
            self.log.ctypes.data,
            self.LOG_CAP,
            cnt,
            cnt + 8,
        )
        self._sections = sections  # the bases point into these views
        self._handle = kernel.lib.server_new(ctypes.byref(self._cfg))
        if not self._handle:
            raise CpuKernelUnavailable("CPU experts: could not start the expert server thread")

    @property
    def errors(self) -> int:
        """Jobs the server could not read (answered with zeros); nonzero means a bug upstream."""
        return int(self._counters[1])

    def new_records(self) -> np.ndarray:
        """The jobs logged since the last call, oldest first: rows of (layer index, n_miss, n_cpu, M, rows,
        t_start, t_end, the CPU's share of a split expert or 0); at most the last LOG_CAP. The newest record may be
        read while a later one is written: only records before the count are returned, and the count is published
        after its record."""
        n = int(self._counters[0])
        lo = max(self._read, n - self.LOG_CAP + 1)  # the slot at n % cap may be under rewrite
        self._read = n
        if n <= lo:
            return np.zeros((0, 8))
        idx = np.arange(lo, n) % self.LOG_CAP
        return self.log[idx].copy()

    def close(self) -> None:
        if self._handle:
            self.kernel.lib.server_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def column_granule(layout: ExpertLayout) -> int:
    """Intermediate columns a column split moves by: every section's blocks, scale groups and packed zero-point rows
    (and the CPU's 128-wide int8 activation blocks) then split whole."""
    if layout.is_int4:
        assert layout.group is not None
        return math.lcm(layout.group, 128)
    if layout.block is not None:
        return math.lcm(*layout.block, 32)
    return 32


def host_read_GBps(t: torch.Tensor, threads: int, reps: int = 3) -> float:
    """Read bandwidth of host memory `t` (any dtype, contiguous, on the CPU) by `threads` threads streaming it with
    wide loads, as the expert kernel streams weights: the best of `reps` passes, GB/s. A benchmark ceiling."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(
            f"host_read_GBps takes a contiguous host tensor, got a "
            f"{'contiguous' if t.is_contiguous() else 'strided'} one on {t.device}"
        )
    lib = _build()
    n = t.numel() * t.element_size()
    lib.read_bytes(t.data_ptr(), n, threads)  # first touch, threads woken
    return n / min(lib.read_bytes(t.data_ptr(), n, threads) for _ in range(reps)) / 1e9


def expert_forward_reference(
    expert: dict[str, torch.Tensor], x: torch.Tensor, layout: ExpertLayout, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """The same expert in float64 from the stored weights (FP8 and int4 dequantised exactly): [M, K] -> [M, K];
    with `cols` (c0, c1) only intermediate columns [c0, c1) of it (the parts of a column split add up to the whole)."""
    N = layout.inter
    if layout.is_int4:
        w13, w2 = (
            dequantize_int4(
                Int4Weight(expert[w], expert[f"{w}_scale"], expert[f"{w}_zeros"], layout.group), torch.float64
            )
            for w in ("w13", "w2")
        )
    elif layout.block is not None:
        bn, bk = layout.block
        w13 = dequantize_block_fp8(expert["w13"], expert["w13_scale"], bn, bk, torch.float64)
        w2 = dequantize_block_fp8(expert["w2"], expert["w2_scale"], bn, bk, torch.float64)
    else:
        w13, w2 = expert["w13"].double(), expert["w2"].double()
    c0, c1 = cols or (0, N)
    gu = x.double() @ w13.T
    return (F.silu(gu[:, c0:c1]) * gu[:, N + c0 : N + c1]) @ w2[:, c0:c1].T

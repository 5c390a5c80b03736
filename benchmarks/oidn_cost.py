"""What OpenImageDenoise itself costs on this machine's CPUs, outside Cycles (issue 15, item 3).

    python benchmarks/oidn_cost.py [--sizes 48,96,128,160,192,256,276] [--threads 2] [--quality fast] [--json FILE]

Cycles denoises each rendered view with the OpenImageDenoise library that the bpy wheel ships
(``bpy/lib/libOpenImageDenoise.so.2``). This calls that same library through its C API (ctypes; bpy itself is
not imported) with the job's filter settings (the "RT" filter, colour + albedo + normal, HDR, the job's
``denoise_quality``), on square images of each size, and reports the filter's own time: commit (network set-up)
and execute, best of ``--reps``. The filter's arithmetic does not depend on the pixel values, so the inputs
are random. Set beside benchmarks/measure_render_costs.py's ``sizes`` (the denoise cost of a whole Cycles
render call, the same sizes), the difference is what Cycles adds around the library: reading and scaling
its passes, the guide passes during path tracing, writing the result back.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

QUALITY = {"default": 0, "fast": 4, "balanced": 5, "high": 6}  # OIDNQuality
FLOAT3 = 3  # OIDN_FORMAT_FLOAT3
DEVICE_CPU = 1  # OIDN_DEVICE_TYPE_CPU


def library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("bpy")
    if spec is None or spec.origin is None:
        raise SystemExit("bpy is not installed (make install): its wheel carries the OpenImageDenoise library")
    path = Path(spec.origin).parent / "lib" / "libOpenImageDenoise.so.2"
    if not path.is_file():
        raise SystemExit(f"no OpenImageDenoise library at {path}; this bpy build does not ship one")
    lib = ctypes.CDLL(str(path))
    ptr, cstr, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    lib.oidnNewDevice.restype = ptr
    lib.oidnNewFilter.restype, lib.oidnNewFilter.argtypes = ptr, [ptr, cstr]
    lib.oidnSetDeviceInt.argtypes = [ptr, cstr, ctypes.c_int]
    lib.oidnCommitDevice.argtypes = [ptr]
    lib.oidnSetSharedFilterImage.argtypes = [ptr, cstr, ptr, ctypes.c_int, size, size, size, size, size]
    lib.oidnSetFilterBool.argtypes = [ptr, cstr, ctypes.c_bool]
    lib.oidnSetFilterInt.argtypes = [ptr, cstr, ctypes.c_int]
    lib.oidnCommitFilter.argtypes = lib.oidnExecuteFilter.argtypes = lib.oidnReleaseFilter.argtypes = [ptr]
    lib.oidnGetDeviceError.argtypes = [ptr, ctypes.POINTER(cstr)]
    return lib


def denoise_ms(lib: ctypes.CDLL, device: int, side: int, quality: int, rng: np.random.Generator) -> tuple[float, float]:
    """(commit, execute) milliseconds of one RT filter over a side x side image with albedo and normal."""
    images = {name: np.ascontiguousarray(rng.random((side, side, 3), dtype=np.float32))
              for name in (b"color", b"albedo", b"normal", b"output")}
    flt = lib.oidnNewFilter(device, b"RT")
    for name, arr in images.items():
        lib.oidnSetSharedFilterImage(flt, name, arr.ctypes.data, FLOAT3, side, side, 0, 0, 0)
    lib.oidnSetFilterBool(flt, b"hdr", True)
    lib.oidnSetFilterInt(flt, b"quality", quality)
    t0 = time.perf_counter()
    lib.oidnCommitFilter(flt)
    t1 = time.perf_counter()
    lib.oidnExecuteFilter(flt)
    t2 = time.perf_counter()
    message = ctypes.c_char_p()
    if lib.oidnGetDeviceError(device, ctypes.byref(message)):
        raise SystemExit(f"OpenImageDenoise failed: {message.value.decode()}")
    lib.oidnReleaseFilter(flt)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="48,96,128,160,192,256,276")
    ap.add_argument("--threads", type=int, default=2, help="OpenImageDenoise threads (the job's Blender gets >= 2)")
    ap.add_argument("--quality", choices=sorted(QUALITY), default="fast", help="the job's denoise_quality")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    lib = library()
    device = lib.oidnNewDevice(DEVICE_CPU)
    lib.oidnSetDeviceInt(device, b"numThreads", args.threads)
    lib.oidnCommitDevice(device)
    rng = np.random.default_rng(0)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        commit, execute = min((denoise_ms(lib, device, side, QUALITY[args.quality], rng) for _ in range(args.reps)),
                              key=sum)
        rows.append({"side": side, "commit_ms": round(commit, 2), "execute_ms": round(execute, 2),
                     "us_per_pixel": round(1e3 * (commit + execute) / side ** 2, 3)})
        print(f"{side:4d} px square: commit {commit:5.2f} ms, execute {execute:6.2f} ms, "
              f"{rows[-1]['us_per_pixel']:.3f} us a pixel", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "quality": args.quality, "reps": args.reps,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

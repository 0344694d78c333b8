"""What the CUDA execution provider needs, and why it did not come up when it did not.

onnxruntime-gpu on PyPI is built for one CUDA major version per release line; a wheel whose CUDA
libraries are absent still lists CUDAExecutionProvider in `get_available_providers()` and then
builds every session on CPU. `CUDA_MAJOR_BY_ORT` records which CUDA major each line needs (read
from each wheel's `[cuda]` extra: `nvidia-cuda-runtime-cu12` or `nvidia-cuda-runtime~=13.0`); the
GPU image's base (Dockerfile `CUDA_IMAGE`) must match it, which tests/deploy checks.
"""

from __future__ import annotations

import importlib.metadata
import os
import struct
from pathlib import Path

import onnxruntime as ort

# (first minor, last minor) of onnxruntime-gpu 1.x on PyPI -> (CUDA major, cuDNN major), read from the
# wheels' METADATA (`pip download onnxruntime-gpu==1.N --no-deps`, 2026-12-01). Only lines checked so
# far are listed: the `gpu` extra's pin in pyproject.toml must stay inside one of them.
CUDA_MAJOR_BY_ORT: dict[tuple[int, int], tuple[int, int]] = {
    (22, 26): (12, 9),
    (27, 31): (13, 9),
}

CUDNN_LIBRARY = "libcudnn.so.9"  # ORT's CUDA provider opens cuDNN 9 at run time, not as DT_NEEDED


def cuda_requirement(ort_version: str) -> tuple[int, int] | None:
    """(CUDA major, cuDNN major) that onnxruntime-gpu `ort_version` is built for; None if unknown."""
    parts = ort_version.split(".")
    if len(parts) < 2 or parts[0] != "1" or not parts[1].isdigit():
        return None
    minor = int(parts[1])
    for (low, high), need in CUDA_MAJOR_BY_ORT.items():
        if low <= minor <= high:
            return need
    return None


def _gpu_wheel_version() -> str | None:
    try:
        return importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def needed_libraries(library: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared library ([] when it is not one)."""
    data = library.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        return []
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, file offset, size) of PT_LOAD segments
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = [struct.unpack_from("<qQ", data, dynamic[0] + k) for k in range(0, dynamic[1], 16)]
    strtab = next((value for tag, value in entries if tag == 5), None)
    if strtab is None:
        return []
    base = next((off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), None)
    if base is None:
        return []
    names = []
    for tag, value in entries:
        if tag == 0:
            break
        if tag == 1:
            start = base + value
            names.append(data[start : data.index(b"\0", start)].decode())
    return names


def _library_dirs(origin: Path) -> list[Path]:
    """Where the dynamic loader (and onnxruntime's preload_dlls, for NVIDIA's pip wheels) looks."""
    dirs = [Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs.append(origin)
    dirs += [Path(p) for p in ("/usr/local/cuda/lib64", "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib")]
    for root in ("/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        dirs += [Path(root), *Path(root).glob("*-linux-gnu")]
    site = origin.parent.parent  # site-packages
    dirs += sorted(site.glob("nvidia/*/lib")) + sorted(site.glob("nvidia/cu*/lib"))
    return dirs


def missing_libraries(names: list[str], origin: Path) -> list[str]:
    """The `names` the loader would not find (searched directories plus the ld.so.cache)."""
    dirs = _library_dirs(origin)
    cache = Path("/etc/ld.so.cache")
    cached = cache.read_bytes() if cache.is_file() else b""
    return [
        n
        for n in names
        if not any((d / n).exists() for d in dirs) and b"\0" + n.encode() + b"\0" not in cached
    ]


def cuda_unavailable_reason() -> str:
    """One line saying why a CUDA session came up on CPU, as far as can be found out here.

    ORT logs the failed `dlopen` of its CUDA provider library to stderr; here the libraries that
    provider needs (its ELF DT_NEEDED entries, and cuDNN, which it opens later) are looked up where
    the dynamic loader would look, so the reason names every one that is missing.
    """
    version = _gpu_wheel_version()
    need = cuda_requirement(version) if version else None
    needs = f" (onnxruntime-gpu {version} needs CUDA {need[0]} and cuDNN {need[1]})" if need else ""
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return (
            f"this onnxruntime ({ort.__version__}) has no CUDA provider library: "
            "install onnxruntime-gpu instead of onnxruntime"
        )
    missing = missing_libraries([*needed_libraries(library), CUDNN_LIBRARY], library.parent)
    if missing and missing != ["libcuda.so.1"]:
        return f"the CUDA/cuDNN libraries could not be loaded: {', '.join(missing)} not found{needs}"
    if missing:
        return "the NVIDIA driver (libcuda.so.1) is not loadable: no GPU visible to this process"
    return f"the CUDA provider failed to start (no usable GPU, or see ONNX Runtime's log){needs}"

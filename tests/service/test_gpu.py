"""service/gpu.py: the CUDA requirement table and the missing-library diagnosis, on real files."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from service.gpu import cuda_requirement, cuda_unavailable_reason, missing_libraries, needed_libraries


def test_needed_libraries_of_a_real_shared_library_and_which_are_missing() -> None:
    (library,) = (Path(ort.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so")
    needed = needed_libraries(library)
    assert "libc.so.6" in needed
    assert missing_libraries([*needed, "libcublasLt.so.99"], library.parent) == ["libcublasLt.so.99"]
    assert needed_libraries(Path(__file__)) == []  # not an ELF file


def test_reason_names_what_is_missing() -> None:
    reason = cuda_unavailable_reason()
    if not (Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so").is_file():
        assert "install onnxruntime-gpu instead of onnxruntime" in reason
    else:  # the GPU wheel: a library, the driver, or the GPU itself
        assert "not found" in reason or "driver" in reason or "failed to start" in reason
    assert cuda_requirement("1.31.1") == (13, 9)

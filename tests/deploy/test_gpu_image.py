"""The GPU image's CUDA base and the onnxruntime-gpu it installs agree on the CUDA major version.

onnxruntime-gpu built for CUDA 13 on a CUDA 12 base (or the reverse) cannot load its CUDA provider:
every session comes up on CPU (and `execution_providers=cuda` refuses to serve). The table of which
release line needs which CUDA is service/gpu.py's CUDA_MAJOR_BY_ORT.
"""

from __future__ import annotations

import itertools
import re
import tomllib

from service.gpu import CUDA_MAJOR_BY_ORT, cuda_requirement
from tests.service.support import REPO_ROOT


def _image_cuda_major() -> int:
    text = (REPO_ROOT / "Dockerfile").read_text()
    match = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn(\d*)-runtime-", text, re.M)
    assert match, "Dockerfile: ARG CUDA_IMAGE=nvidia/cuda:<X.Y.Z>-cudnn-runtime-… not found"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS gpu$", text, re.M), "the gpu target must use CUDA_IMAGE"
    return int(match.group(1))


def _pinned_minors() -> range:
    """The onnxruntime-gpu 1.x minors the `gpu` extra admits (it must give both bounds)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["optional-dependencies"]["gpu"] if d.startswith("onnxruntime-gpu")]
    match = re.fullmatch(r"onnxruntime-gpu>=1\.(\d+)(?:\.\d+)?,<1\.(\d+)", spec.replace(" ", ""))
    assert match, f"pin onnxruntime-gpu to a range of known release lines, got {spec!r}"
    return range(int(match.group(1)), int(match.group(2)))


def test_gpu_base_image_matches_the_pinned_onnxruntime_gpu() -> None:
    image_major = _image_cuda_major()
    minors = _pinned_minors()
    assert minors, "empty onnxruntime-gpu range"
    for minor in minors:
        need = cuda_requirement(f"1.{minor}.0")
        assert need is not None, (
            f"onnxruntime-gpu 1.{minor} is not in service/gpu.py's table: check its wheel"
        )
        assert need[0] == image_major, (
            f"onnxruntime-gpu 1.{minor} needs CUDA {need[0]}, the gpu image's base is CUDA {image_major}"
        )


def test_the_table_has_no_overlaps_and_reads_versions() -> None:
    spans = sorted(CUDA_MAJOR_BY_ORT)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert cuda_requirement("1.31.1") == (13, 9)
    assert cuda_requirement("1.24.1") == (12, 9)
    assert cuda_requirement("1.18.0") is None and cuda_requirement("2.0.0") is None

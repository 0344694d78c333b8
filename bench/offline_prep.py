"""Preparation for the offline GPU benchmark, run on a connected machine.

GPU hosts are often air-gapped: python3.12, a CUDA build of torch, CPU onnxruntime, nothing of ours.
This builds what such a host needs in one folder:

  wheelhouse/   cp312 manylinux x86_64 wheels of the service's dependencies, onnxruntime-gpu in
                place of onnxruntime (the `gpu` extra's pin) and what bench's cost/server parts import
  wheelhouse/<onnxruntime-gpu wheel>.partNNN   the GPU wheel (~250 MB) in parts of at most 58 MiB,
                since transfers to such hosts often cap file sizes; any other file over the cap too
  parts.json    each split file's name, size and SHA-256, and each part's
  SHA256SUMS    `sha256sum -c SHA256SUMS` format, every wheel and part

    python -m bench.offline_prep --out build/offline-gpu

On the GPU host, `python3 -m bench.offline_prep --join DIR` (stdlib only) reassembles the split
wheels, checking every checksum. Only the stdlib is used here, so the joining side needs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

MIB = 1024 * 1024
PART_LIMIT = 58 * MIB
PYTHON_VERSION = "3.12"
# newest first; pip accepts a wheel tagged for any of them (pure-Python wheels match all)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# what bench's cost and server parts import beyond the service's dependencies
BENCH_REQUIREMENTS = ("onnx>=1.16", "httpx>=0.27", "typer>=0.12")
REPO_ROOT = Path(__file__).resolve().parent.parent


def requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The service's dependencies with onnxruntime swapped for the `gpu` extra, plus bench's."""
    project = tomllib.loads(pyproject.read_text())["project"]
    base = [d for d in project["dependencies"] if not d.replace(" ", "").startswith("onnxruntime")]
    return [*base, *project["optional-dependencies"]["gpu"], *BENCH_REQUIREMENTS]


def pip_download_command(wheelhouse: Path, reqs: list[str]) -> list[str]:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--implementation", "cp",
        "--python-version", PYTHON_VERSION, "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
        *platforms, "--dest", str(wheelhouse), *reqs,
    ]  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def split(path: Path, limit: int = PART_LIMIT) -> dict[str, object]:
    """Replace `path` by `<name>.part000`, … of at most `limit` bytes; returns its parts.json entry."""
    entry: dict[str, object] = {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path)}
    parts = []
    with path.open("rb") as f:
        for index in range(10_000):
            chunk = f.read(limit)
            if not chunk:
                break
            part = path.with_name(f"{path.name}.part{index:03d}")
            part.write_bytes(chunk)
            parts.append({"name": part.name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    path.unlink()
    entry["parts"] = parts
    return entry


def join(folder: Path) -> list[Path]:
    """Reassemble every split file listed in `folder/parts.json`, checking each checksum."""
    manifest = json.loads((folder / "parts.json").read_text())
    wheelhouse = folder / manifest["wheelhouse"]
    joined = []
    for entry in manifest["files"]:
        target = wheelhouse / entry["name"]
        digest = hashlib.sha256()
        with target.with_suffix(target.suffix + ".tmp").open("wb") as out:
            for part in entry["parts"]:
                data = (wheelhouse / part["name"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise SystemExit(f"{part['name']}: checksum mismatch (transfer damaged it)")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != entry["sha256"]:
            raise SystemExit(f"{entry['name']}: reassembled checksum mismatch")
        target.with_suffix(target.suffix + ".tmp").replace(target)
        joined.append(target)
    return joined


def prepare(out: Path, limit: int = PART_LIMIT, reqs: list[str] | None = None) -> dict[str, object]:
    wheelhouse = out / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    subprocess.run(pip_download_command(wheelhouse, reqs or requirements()), check=True)
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not any(w.name.startswith("onnxruntime_gpu-") for w in wheels):
        raise SystemExit("no onnxruntime_gpu wheel was downloaded")
    files = [split(w, limit) for w in wheels if w.stat().st_size > limit]
    manifest: dict[str, object] = {
        "python": PYTHON_VERSION,
        "platforms": list(PLATFORMS),
        "part_limit_bytes": limit,
        "wheelhouse": wheelhouse.name,
        "files": files,
    }
    (out / "parts.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sums = [f"{sha256(p)}  {wheelhouse.name}/{p.name}" for p in sorted(wheelhouse.iterdir()) if p.is_file()]
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.offline_prep", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "offline-gpu")
    parser.add_argument("--join", type=Path, help="on the GPU host: reassemble the split wheels in DIR")
    parser.add_argument("--part-mib", type=int, default=PART_LIMIT // MIB)
    args = parser.parse_args(argv)
    if args.join is not None:
        for path in join(args.join):
            print(f"reassembled {path}")
        return
    manifest = prepare(args.out, args.part_mib * MIB)
    files = manifest["files"]
    assert isinstance(files, list)
    print(f"wheelhouse in {args.out / 'wheelhouse'}; split: {', '.join(f['name'] for f in files) or 'none'}")


if __name__ == "__main__":
    main()

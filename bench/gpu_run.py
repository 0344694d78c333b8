"""The run step of the offline GPU benchmark, on an air-gapped GPU host (issue 18).

    python3 -m bench.gpu_run --wheelhouse build/offline-gpu --target /tmp/hydra-site --out /tmp/gpu-out
    python3 -m bench.gpu_run --out DIR --allow-cpu --budget-s 20      (a trial here, on CPU)

1. With --wheelhouse (the folder `python -m bench.offline_prep` wrote, or its wheelhouse/): reassemble
   the split wheels (offline_prep's join, every SHA-256 checked), `pip install --no-index` onnxruntime-gpu
   and then the service's dependencies into --target, and re-run itself with PYTHONPATH=TARGET:repo and
   the NVIDIA pip libraries (CUDA, cuDNN; torch's, on such hosts) on LD_LIBRARY_PATH. Without it, whatever
   onnxruntime is importable is used.
2. Asserts CUDA is really in use: a session on models/digits/1/model.onnx asked for CUDAExecutionProvider
   must report it first, else exit 2 with the reason (service.gpu's diagnosis). `--allow-cpu` carries on
   on CPU and labels every result "CPU (allowed)".
3. Cost: Hydra (model.onnx) vs the ensemble (ensemble.onnx) at batch 1, 8, 64, 256, 1024, seeded rows shaped
   like the manifest's input, the two graphs interleaved in slices; median ms and rows/s.
4. Server: `python -m service` on 127.0.0.1 with HYDRA_EXECUTION_PROVIDERS=cuda and =cpu under a stdlib
   load generator (http.client, one keep-alive connection per thread, 1-row V2 requests, 1/8/32 clients,
   fixed duration), whose own ceiling is measured against a trivial stdlib HTTP server in the same run.
   If the service's dependencies could not be installed, gpu_server.json says so instead.
5. Writes gpu_env.json, gpu_cost.json, gpu_server.json and gpu_run.log to --out (4 files), within --budget-s.

Imports only the standard library at module level; numpy and onnxruntime once the target is on the path.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.servers import free_port, service_command

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "models" / "digits" / "1"
BATCHES = (1, 8, 64, 256, 1024)
CONCURRENCIES = (1, 8, 32)
SERVER_MAX_BATCH = 256
CHILD_ENV = "HYDRA_GPU_RUN_CHILD"  # set when re-executed after the install: the install report (JSON)
T0_ENV = "HYDRA_GPU_RUN_T0"  # wall-clock start, so the budget spans the install and the re-exec
CUDA_OPTIONS = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}  # as the server's
CPU_ALLOWED = "CPU (allowed)"


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=1, default=str) + "\n")


# --------------------------------------------------------------------------------------------- install


def wheelhouse_dirs(path: Path) -> tuple[Path | None, Path]:
    """(folder holding parts.json or None, folder holding the wheels) for --wheelhouse PATH."""
    for folder in (path, path.parent):
        manifest = folder / "parts.json"
        if manifest.is_file():
            return folder, folder / json.loads(manifest.read_text())["wheelhouse"]
    return None, path / "wheelhouse" if (path / "wheelhouse").is_dir() else path


def pip_install_command(wheels: Path, target: Path, reqs: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--target",
        str(target), "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade", *reqs,
    ]  # fmt: skip


def service_requirements() -> list[str]:
    """The service's own dependencies (pyproject.toml), without onnxruntime (installed first)."""
    from bench.offline_prep import requirements

    return [r for r in requirements() if not r.replace(" ", "").startswith("onnxruntime")]


def install(wheelhouse: Path, target: Path, log: Log) -> dict[str, Any]:
    from bench.offline_prep import join

    report: dict[str, Any] = {"wheelhouse": str(wheelhouse), "target": str(target)}
    folder, wheels = wheelhouse_dirs(wheelhouse)
    if folder is not None:
        joined = join(folder)
        report["joined"] = [p.name for p in joined]
        log(f"reassembled {', '.join(p.name for p in joined) or 'nothing'} (checksums verified)")
    target.mkdir(parents=True, exist_ok=True)
    gpu = [w.name for w in wheels.glob("onnxruntime_gpu-*.whl")]
    if not gpu:
        raise SystemExit(f"no onnxruntime_gpu wheel in {wheels} (were all the parts carried?)")
    done = subprocess.run(
        pip_install_command(wheels, target, ["onnxruntime-gpu"]), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"pip could not install onnxruntime-gpu from {wheels}:\n{done.stderr[-2000:]}")
    report["onnxruntime_gpu_wheel"] = gpu[0]
    log(f"installed {gpu[0]} into {target}")
    reqs = service_requirements()
    done = subprocess.run(pip_install_command(wheels, target, reqs), capture_output=True, text=True)
    report["service_dependencies"] = "installed" if done.returncode == 0 else done.stderr.strip()[-1500:]
    log(
        "service dependencies: "
        + ("installed" if done.returncode == 0 else "NOT installable: " + done.stderr[-300:])
    )
    return report


def nvidia_library_dirs(paths: list[str]) -> list[str]:
    """lib folders of NVIDIA's pip wheels (nvidia/<lib>/lib, nvidia/cu13/lib) under the given sys.path."""
    found: list[str] = []
    for entry in paths:
        root = Path(entry) / "nvidia"
        if root.is_dir():
            for lib in sorted([*root.glob("*/lib"), *root.glob("*/lib64")]):
                if str(lib) not in found:
                    found.append(str(lib))
    return found


def reexec(argv: list[str], target: Path, report: dict[str, Any]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    libs = nvidia_library_dirs([str(target), *sys.path])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *[p for p in [env.get("LD_LIBRARY_PATH")] if p]])
    env[CHILD_ENV] = json.dumps(report | {"nvidia_library_dirs": libs})
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu_run", *argv], env)


# ---------------------------------------------------------------------------------------- environment


def nvidia_smi() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"present": False}
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"present": True, "error": str(exc)}
    rows = [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
    gpus = [
        {"name": r[0], "driver": r[1] if len(r) > 1 else "", "memory": r[2] if len(r) > 2 else ""}
        for r in rows
    ]
    return {"present": True, "gpus": gpus, **({"error": done.stderr.strip()} if done.returncode else {})}


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cuda_reason() -> str:
    try:
        from service.gpu import cuda_unavailable_reason
    except Exception as exc:
        return f"(service.gpu not importable for a diagnosis: {exc})"
    return cuda_unavailable_reason()


def check_cuda(ort: Any, allow_cpu: bool) -> tuple[list[Any], dict[str, Any]]:
    """The providers every part uses, and what the CUDA check found."""
    preload = None
    if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
            preload = "ok"
        except Exception as exc:
            preload = f"failed: {exc}"
    asked = [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(PACKAGE / "model.onnx"), providers=asked)
    got = session.get_providers()
    info: dict[str, Any] = {"session_providers": got, "preload_dlls": preload}
    if got and got[0] == "CUDAExecutionProvider":
        return asked, info | {"cuda": True, "label": "CUDA"}
    info |= {"cuda": False, "reason": f"CUDA is not in use: the session came up on {got}; {cuda_reason()}"}
    if not allow_cpu:
        return [], info
    return ["CPUExecutionProvider"], info | {"label": CPU_ALLOWED}


# ------------------------------------------------------------------------------------------------ cost


def run_cost(
    ort: Any, np: Any, providers: list[Any], seconds_per_cell: float, deadline: float, log: Log
) -> dict[str, Any]:
    manifest = json.loads((PACKAGE / "manifest.json").read_text())
    row_shape = [int(d) for d in manifest["input"]["shape"][1:]]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        g: ort.InferenceSession(str(PACKAGE / f), options, providers=providers)
        for g, f in (("hydra", "model.onnx"), ("ensemble", "ensemble.onnx"))
    }
    rng = np.random.default_rng(0)
    cells = []
    slices = 5
    for batch in BATCHES:
        if time.monotonic() > deadline:
            log(f"cost: budget spent before batch {batch}")
            break
        x = rng.standard_normal((batch, *row_shape)).astype(np.float32)
        feeds = {g: {s.get_inputs()[0].name: x} for g, s in sessions.items()}
        for g, s in sessions.items():  # warm-up: allocations, cuDNN algorithm choice for this shape
            for _ in range(3):
                s.run(None, feeds[g])
        samples: dict[str, list[float]] = {g: [] for g in sessions}
        for _ in range(slices):
            for g, s in sessions.items():
                stop = time.perf_counter() + seconds_per_cell / slices
                while True:
                    t = time.perf_counter()
                    s.run(None, feeds[g])
                    samples[g].append(time.perf_counter() - t)
                    if t > stop or time.monotonic() > deadline:
                        break
        timings = {}
        for g, values in samples.items():
            median = statistics.median(values)
            timings[g] = {"median_ms": 1e3 * median, "rows_per_s": batch / median, "runs": len(values)}
        speedup = timings["ensemble"]["median_ms"] / timings["hydra"]["median_ms"]
        cells.append({"batch": batch, "timings": timings, "speedup_vs_ensemble": speedup})
        log(
            f"cost batch {batch}: hydra {timings['hydra']['median_ms']:.3f} ms, "
            f"ensemble {timings['ensemble']['median_ms']:.3f} ms ({speedup:.2f}x)"
        )
    return {
        "package": str(PACKAGE.relative_to(REPO_ROOT)),
        "row_shape": row_shape,
        "seconds_per_cell": seconds_per_cell,
        "slices": slices,
        "cells": cells,
    }


# ---------------------------------------------------------------------------------------------- server


class _Trivial(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    body = json.dumps(
        {
            "model_name": "digits",
            "outputs": [{"name": "p", "shape": [1, 10], "datatype": "FP32", "data": [0.1] * 10}],
        }
    ).encode()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


def trivial_server(port: int) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Trivial)
    server.daemon_threads = True
    server.serve_forever()


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """None once GET path answers 200; else why not."""
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return None
        except OSError:
            pass
        time.sleep(0.1)
    return f"not ready after {timeout:.0f} s"


def load(
    port: int, path: str, body: bytes, concurrency: int, seconds: float, warmup: float = 0.3
) -> dict[str, Any]:
    """`concurrency` threads, each one keep-alive connection sending `body` back to back."""
    start = time.perf_counter() + warmup
    stop = start + seconds
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    headers = {"Content-Type": "application/json"}

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while (t := time.perf_counter()) < stop:
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if t >= start:
                if ok:
                    latencies[i].append(time.perf_counter() - t)
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + warmup + 15)
    done = sorted(x for lat in latencies for x in lat)
    n = len(done)
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": n,
        "errors": sum(errors),
        "requests_per_s": n / seconds,
        "p50_ms": 1e3 * done[n // 2] if n else None,
        "p99_ms": 1e3 * done[min(n - 1, int(0.99 * n))] if n else None,
    }


def v2_body(np: Any, row_shape: list[int]) -> bytes:
    row = np.random.default_rng(1).standard_normal((1, *row_shape)).astype(np.float32)
    tensor = {
        "name": "input",
        "shape": list(row.shape),
        "datatype": "FP32",
        "data": row.reshape(-1).round(4).tolist(),
    }
    return json.dumps({"inputs": [tensor]}).encode()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def service_importable() -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import service.app"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return (
        None
        if done.returncode == 0
        else done.stderr.strip().splitlines()[-1]
        if done.stderr.strip()
        else f"status {done.returncode}"
    )


def run_server(np: Any, cuda: bool, deadline: float, log: Log) -> dict[str, Any]:
    manifest = json.loads((PACKAGE / "manifest.json").read_text())
    body = v2_body(np, [int(d) for d in manifest["input"]["shape"][1:]])
    path = f"/v2/models/{manifest['name']}/infer"
    result: dict[str, Any] = {
        "rows_per_request": 1,
        "concurrencies": list(CONCURRENCIES),
        "max_batch_size": SERVER_MAX_BATCH,
        "client": "stdlib http.client, one thread and one keep-alive connection per client, "
        "in the run step's process",
        "configs": {},
    }
    missing = service_importable()
    configs = ["cuda", "cpu"] if cuda else ["cpu"]
    if missing:
        result["skipped"] = f"the service's dependencies are not importable here: {missing}"
        log(f"server: {result['skipped']}")
        configs = []
    elif not cuda:
        result["configs"]["cuda"] = {"skipped": "CUDA is not in use (CPU allowed)"}
    starts = len(configs) * 6.0 + 1.0  # rough start-up allowance per server
    cells = 3 * (len(configs) + 1)
    seconds = max(0.3, min(10.0, (deadline - time.monotonic() - starts) / cells - 0.4))
    result["seconds_per_cell"] = round(seconds, 2)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_run", "--trivial-server", str(port)], cwd=REPO_ROOT
    )
    try:
        why = wait_ready(port, "/", proc, 20)
        result["ceiling"] = (
            {"skipped": why}
            if why
            else {"cells": [load(port, path, body, c, seconds) for c in CONCURRENCIES]}
        )
        log(
            "client ceiling (trivial stdlib server): "
            f"{[round(c['requests_per_s']) for c in result['ceiling'].get('cells', [])]} req/s"
        )
    finally:
        _stop(proc)
    for config in configs:
        if time.monotonic() + 3 * seconds > deadline:
            result["configs"][config] = {"skipped": "budget spent"}
            continue
        port = free_port()
        env = dict(os.environ, HYDRA_EXECUTION_PROVIDERS=config, HYDRA_LOG_LEVEL="warning")
        env["HYDRA_GRPC_PORT"] = "0"  # HTTP only: the GPU run measures the model, not gRPC
        cmd = service_command(port, REPO_ROOT / "models", "--max-batch-size", str(SERVER_MAX_BATCH))
        t = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            why = wait_ready(
                port,
                "/v2/health/ready",
                proc,
                max(5.0, min(120.0, deadline - time.monotonic() - 3 * seconds)),
            )
            entry: dict[str, Any] = {
                "env": f"HYDRA_EXECUTION_PROVIDERS={config}",
                "start_s": round(time.monotonic() - t, 2),
            }
            if why:
                _stop(proc)
                tail = proc.stdout.read().decode(errors="replace")[-1500:] if proc.stdout else ""
                result["configs"][config] = entry | {
                    "failed": f"the server did not come up ({why})",
                    "log_tail": tail,
                }
                log(f"server {config}: did not come up ({why}): {tail[-300:]}")
                continue
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/v2/models/{manifest['name']}")
            meta = conn.getresponse().read().decode(errors="replace")
            found = re.search(r'"execution_provider"\s*:\s*"([^"]+)"', meta)
            entry["provider_reported"] = found.group(1) if found else None
            entry["cells"] = [load(port, path, body, c, seconds) for c in CONCURRENCIES]
            result["configs"][config] = entry
            log(
                f"server {config} ({entry['provider_reported']}): "
                f"{[round(c['requests_per_s']) for c in entry['cells']]} req/s"
            )
        finally:
            _stop(proc)
    return result


# ------------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_run", description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, help="offline_prep's output folder (or its wheelhouse/)")
    parser.add_argument(
        "--target", type=Path, default=Path("/tmp/hydra-gpu-site"), help="private install folder"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-results"), help="folder for the result files")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="carry on on CPU (trial runs); labelled CPU (allowed)"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="finish within this many seconds")
    parser.add_argument("--trivial-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.trivial_server is not None:
        trivial_server(args.trivial_server)
        return 0
    t0 = float(os.environ.get(T0_ENV) or time.time())
    os.environ[T0_ENV] = str(t0)
    deadline = time.monotonic() + args.budget_s - (time.time() - t0) - 2.0  # 2 s to write the results
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_run.log")
    child = os.environ.get(CHILD_ENV)
    if args.wheelhouse is not None and child is None:
        log(f"python {platform.python_version()} at {sys.executable}; installing from {args.wheelhouse}")
        reexec(argv, args.target.resolve(), install(args.wheelhouse, args.target.resolve(), log))
    installed: dict[str, Any] = (
        json.loads(child)
        if child
        else {"wheelhouse": None, "note": "no --wheelhouse: whatever onnxruntime was importable"}
    )

    import numpy as np
    import onnxruntime as ort

    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "command": "python3 -m bench.gpu_run " + " ".join(argv),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "available_providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "nvidia_smi": nvidia_smi(),
        "install": installed,
        "budget_s": args.budget_s,
    }
    providers, check = check_cuda(ort, args.allow_cpu)
    env |= check
    log(f"onnxruntime {ort.__version__} ({ort.__file__}); session providers {check['session_providers']}")
    if not providers:
        env["elapsed_s"] = round(time.time() - t0, 1)
        _write(args.out, "gpu_env.json", env)
        log(check["reason"])
        print(check["reason"], file=sys.stderr)
        return 2
    if not check["cuda"]:
        log(f"{check['reason']} -- carrying on: {CPU_ALLOWED}")
    label = check["label"]
    cost_deadline = time.monotonic() + 0.35 * (deadline - time.monotonic())
    per_cell = max(0.05, min(6.0, (cost_deadline - time.monotonic()) / (len(BATCHES) * 2) - 0.1))
    cost = run_cost(ort, np, providers, per_cell, cost_deadline, log)
    _write(
        args.out,
        "gpu_cost.json",
        {
            "provider": label,
            "providers": [p if isinstance(p, str) else p[0] for p in providers],
            "cuda_options": CUDA_OPTIONS if check["cuda"] else None,
            "timing": "InferenceSession.run with numpy inputs and outputs (host-device copies included)",
            **cost,
        },
    )
    try:
        server = run_server(np, check["cuda"], deadline, log)
    except Exception as exc:
        server = {"skipped": f"the server part failed: {exc!r}"}
        log(server["skipped"])
    _write(args.out, "gpu_server.json", {"provider": label, **server})
    env["elapsed_s"] = round(time.time() - t0, 1)
    _write(args.out, "gpu_env.json", env)
    log(f"done in {env['elapsed_s']} s: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

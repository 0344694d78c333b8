"""Bounded traffic generator mixing in-distribution and OOD rows, to watch the dashboard move.

Sends V1 `:predict` requests to a running server at a fixed request rate, following a schedule of
phases `OOD_FRACTION:SECONDS` (default: a minute of clean traffic, a minute with half the rows
out-of-distribution, a minute clean again). Prints, per phase, what the server answered: requests by
status, rows, and the share of rows it flagged OOD — the same number the Grafana panel "OOD flag rate
vs alpha" shows.

    docker compose up -d          # or: make serve
    .venv/bin/python bench/traffic.py --model digits --id-source digits
    .venv/bin/python bench/traffic.py --model clf --id-source gaussian --rate 50 --schedule 0:30,1:30

ID rows: `digits` (scikit-learn's digits, what models/digits was trained on), `gaussian` (N(0, 1)
per feature, the law of the test models' calibration data) or `npy:PATH` (a float array of rows).
OOD rows: `noise` (uniform over each feature's ID range: pixel noise for digits) or `shift` (ID rows
moved by `--shift` ID standard deviations). Everything is bounded: duration, rate, rows, in-flight.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer

MAX_SECONDS = 3600.0
MAX_RATE = 500.0

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@dataclass
class PhaseReport:
    ood_fraction: float
    seconds: float
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    rows: int = 0
    ood_rows_sent: int = 0
    flagged: int = 0
    latencies: list[float] = field(default_factory=list)

    def line(self) -> str:
        answered = sum(n for code, n in self.statuses.items() if code == 200)
        rate = self.flagged / self.rows if self.rows else float("nan")
        p99 = float(np.percentile(self.latencies, 99)) * 1000 if self.latencies else float("nan")
        codes = " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items()))
        return (
            f"ood_fraction={self.ood_fraction:.2f} {self.seconds:.0f}s  requests {codes or '-'}  "
            f"rows={self.rows} (ood sent {self.ood_rows_sent})  flagged={rate:.3f}  "
            f"p99={p99:.1f} ms  ok={answered}"
        )


def parse_schedule(text: str) -> list[tuple[float, float]]:
    phases: list[tuple[float, float]] = []
    for part in text.split(","):
        fraction, _, seconds = part.partition(":")
        phase = (float(fraction), float(seconds))
        if not 0.0 <= phase[0] <= 1.0 or phase[1] <= 0:
            raise typer.BadParameter(f"phase {part!r}: need OOD_FRACTION in [0, 1] and SECONDS > 0")
        phases.append(phase)
    if sum(s for _, s in phases) > MAX_SECONDS:
        raise typer.BadParameter(f"schedule longer than {MAX_SECONDS:.0f} s")
    return phases


def load_id_rows(source: str, features: int, rng: np.random.Generator) -> np.ndarray:
    if source == "digits":
        from sklearn.datasets import load_digits  # training extra; only this source needs it

        rows = load_digits().data.astype(np.float32)
    elif source == "gaussian":
        rows = rng.normal(0.0, 1.0, (5000, features)).astype(np.float32)
    elif source.startswith("npy:"):
        rows = np.load(Path(source[4:])).astype(np.float32).reshape(-1, features)
    else:
        raise typer.BadParameter(f"unknown --id-source {source!r} (digits, gaussian, npy:PATH)")
    if rows.shape[1] != features:
        raise typer.BadParameter(f"ID rows have {rows.shape[1]} features, the model takes {features}")
    return rows


def make_ood_rows(
    kind: str, id_rows: np.ndarray, shift: float, rng: np.random.Generator, n: int
) -> np.ndarray:
    if kind == "noise":
        low, high = id_rows.min(axis=0), id_rows.max(axis=0)
        return rng.uniform(low, np.maximum(high, low + 1e-6), (n, id_rows.shape[1])).astype(np.float32)
    if kind == "shift":
        picked = id_rows[rng.integers(0, len(id_rows), n)]
        scale = id_rows.std(axis=0) + 1e-6
        return (picked + shift * scale).astype(np.float32)
    raise typer.BadParameter(f"unknown --ood-kind {kind!r} (noise, shift)")


async def run(
    url: str,
    model: str,
    api_key: str | None,
    id_source: str,
    ood_kind: str,
    shift: float,
    rate: float,
    rows_per_request: int,
    max_in_flight: int,
    schedule: list[tuple[float, float]],
    seed: int,
) -> list[PhaseReport]:
    rng = np.random.default_rng(seed)
    headers = {"X-API-Key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        meta = await client.get(f"/v2/models/{model}")
        meta.raise_for_status()
        shape = meta.json()["inputs"][0]["shape"]
        features = int(np.prod(shape[1:]))
        id_rows = load_id_rows(id_source, features, rng)
        ood_pool = make_ood_rows(ood_kind, id_rows, shift, rng, 5000)
        slots = asyncio.Semaphore(max_in_flight)
        reports: list[PhaseReport] = []

        async def one(report: PhaseReport, rows: np.ndarray, ood_sent: int) -> None:
            try:
                start = time.perf_counter()
                response = await client.post(f"/v1/models/{model}:predict", json={"instances": rows.tolist()})
                report.latencies.append(time.perf_counter() - start)
                report.statuses[response.status_code] += 1
                if response.status_code == 200:
                    predictions = response.json()["predictions"]
                    report.rows += len(predictions)
                    report.ood_rows_sent += ood_sent
                    report.flagged += sum(bool(p["ood_flag"]) for p in predictions)
            except httpx.HTTPError:
                report.statuses[0] += 1  # transport error: no status
            finally:
                slots.release()

        tasks: set[asyncio.Task[None]] = set()
        for fraction, seconds in schedule:
            report = PhaseReport(fraction, seconds)
            reports.append(report)
            begin = time.monotonic()
            sent = 0
            while (now := time.monotonic()) - begin < seconds:
                due = begin + sent / rate
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                is_ood = rng.random(rows_per_request) < fraction
                rows = id_rows[rng.integers(0, len(id_rows), rows_per_request)].copy()
                rows[is_ood] = ood_pool[rng.integers(0, len(ood_pool), int(is_ood.sum()))]
                await slots.acquire()  # bounded in flight: a slow server slows the sender down
                task = asyncio.create_task(one(report, rows, int(is_ood.sum())))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.gather(*tasks)  # this phase's answers belong to this phase's line
            typer.echo(report.line())
    return reports


@app.command()
def main(
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    model: Annotated[str, typer.Option(help="Model name.")] = "digits",
    api_key: Annotated[str | None, typer.Option(envvar="HYDRA_API_KEY", help="API key, if set.")] = None,
    id_source: Annotated[str, typer.Option(help="digits | gaussian | npy:PATH")] = "digits",
    ood_kind: Annotated[str, typer.Option(help="noise | shift")] = "noise",
    shift: Annotated[float, typer.Option(help="OOD shift in ID standard deviations.")] = 8.0,
    rate: Annotated[float, typer.Option(help="Requests per second.", min=0.1, max=MAX_RATE)] = 20.0,
    rows_per_request: Annotated[int, typer.Option(min=1, max=1024)] = 4,
    max_in_flight: Annotated[int, typer.Option(min=1, max=256)] = 16,
    schedule: Annotated[str, typer.Option(help="Phases OOD_FRACTION:SECONDS, comma separated.")] = (
        "0:60,0.5:60,0:60"
    ),
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Send the schedule, then print a summary line per phase."""
    phases = parse_schedule(schedule)
    reports = asyncio.run(
        run(
            url,
            model,
            api_key,
            id_source,
            ood_kind,
            shift,
            rate,
            rows_per_request,
            max_in_flight,
            phases,
            seed,
        )
    )
    failed = sum(n for r in reports for code, n in r.statuses.items() if code != 200)
    if failed:
        typer.echo(f"{failed} requests did not get a 200", err=True)


if __name__ == "__main__":
    app()

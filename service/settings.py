"""Typed service configuration: environment variables `HYDRA_*` and command-line flags.

Built by `create_app()` (or `python -m service`), never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Settings(BaseSettings):
    """Everything that configures one server process; each field reads `HYDRA_<FIELD>` from the env."""

    model_config = SettingsConfigDict(env_prefix="HYDRA_", extra="forbid", frozen=True)

    host: str = Field(default="0.0.0.0", description="Interface to bind (0.0.0.0: every interface).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    grpc_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        description=(
            "TCP port of the Open Inference Protocol over gRPC, on the same host (MLServer's default "
            "port); 0 turns gRPC off."
        ),
    )
    workers: int = Field(
        default=1,
        ge=0,
        le=256,
        description=(
            "Server processes sharing the HTTP and gRPC ports (SO_REUSEPORT), each with its own "
            "batchers and ONNX Runtime sessions; 0 = one per CPU core this process may use. With "
            "intra_op_threads 0 each worker's sessions get cores / workers threads. Default 1: 2 "
            "workers gave 1.57-1.86x on 2 free cores and 1.06-1.49x on 2 busy ones, at twice the "
            "memory (docs/SERVING.md, Worker processes)."
        ),
    )
    model_repository: Path = Field(
        default=Path("models"),
        description="Directory holding models/<name>/<version>/{model.onnx,manifest.json}.",
    )
    model_versions: dict[str, int] = Field(
        default_factory=dict,
        description='Pinned versions, e.g. {"digits": 1}; models not listed serve their latest version.',
    )
    max_batch_size: int = Field(
        default=64, ge=1, le=65536, description="Rows per model run; 1 turns dynamic batching off."
    )
    max_queue_delay_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=10_000.0,
        description=(
            "Longest time the oldest queued request waits for a batch to fill before it runs "
            "(with run_when_idle, only requests that arrived while a batch was running wait)."
        ),
    )
    run_when_idle: bool = Field(
        default=True,
        description=(
            "A request that finds the model idle waits only for clients just answered that have "
            "not come back, at most one run's fixed cost (a lone client runs at once); only "
            "requests arriving while a batch runs wait up to max_queue_delay_ms for the next "
            "batch to fill. false: every partial batch waits out the delay (Triton's rule)."
        ),
    )
    max_queue_size: int = Field(
        default=1024,
        ge=1,
        description="Requests that may wait in one model's queue; beyond it: 503 + Retry-After.",
    )
    admission_wait_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60.0,
        description=(
            "A request that finds its model's queue full or its in-flight limit reached waits at the "
            "edge for its turn, body unread, when the recent drain rate says its turn comes within "
            "this many seconds; else 503 + Retry-After at once. 0: always refuse at once (Triton's rule)."
        ),
    )
    refusal_hold_max_s: float = Field(
        default=4.0,
        ge=0.0,
        le=60.0,
        description=(
            "After a 503 at the edge the connection is kept, and a request for that model coming back "
            "on it before the refusal's Retry-After has passed waits until then (at most this many "
            "seconds): a client that resends at once costs one refusal per Retry-After. "
            "0: close the connection on a 503 instead (Connection: close)."
        ),
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Deadline from arrival; a request still queued at its deadline is dropped (504).",
    )
    default_alpha: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="OOD flag level α for every model (overrides each manifest's default_alpha when set).",
    )
    execution_providers: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description=(
            "ONNX Runtime provider: cuda = serve a model only if its session runs on CUDA (else it is "
            "not loaded); auto = CUDA when it comes up, else CPU with a warning; cpu."
        ),
    )
    cuda_device_id: int = Field(
        default=0, ge=0, description="GPU the CUDA provider runs on (CUDA device ordinal)."
    )
    cuda_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        default="HEURISTIC",
        description=(
            "cuDNN convolution algorithm search of the CUDA provider; EXHAUSTIVE (ORT's default) "
            "benchmarks algorithms at every new batch shape, a latency spike each time."
        ),
    )
    cuda_use_tf32: bool = Field(
        default=False,
        description="Allow TF32 matmuls/convolutions on CUDA (faster; ~1e-3 relative error in float32).",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ORT intra-op threads per session (0 = ONNX Runtime's default)."
    )
    inter_op_threads: int = Field(
        default=0, ge=0, description="ORT inter-op threads per session (0 = ONNX Runtime's default)."
    )
    max_request_rows: int = Field(
        default=4096, ge=1, description="Most rows one request may carry (400 beyond)."
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest request body, enforced before parsing (413 beyond).",
    )
    request_read_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description=(
            "Longest time a client may take to send its request body after its headers (408 beyond), "
            "so a slow or stalled client cannot hold a connection and a handler indefinitely."
        ),
    )
    cors_allow_origins: str = Field(
        default="",
        description=(
            "Comma-separated browser origins allowed to call the API (CORS), e.g. https://app.example; "
            "empty (the default) = CORS off, no Access-Control-* headers."
        ),
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "When set, prediction routes need it (header X-API-Key or Authorization: Bearer). "
            "Repository load/unload always need it and are disabled without one."
        ),
    )
    listen_backlog: int = Field(
        default=2048,
        ge=1,
        description=(
            "Connections the kernel holds for the server before it accepts them (uvicorn's backlog). "
            "Small (e.g. 64): under overload, clients that reconnect at once after a refusal wait in "
            "the kernel (SYN retry) instead of costing the event loop a refusal each — measured with "
            "1,500 resending clients: goodput from 40–78 to 77–86 per cent of capacity, 0 refusals "
            "(docs/RELIABILITY.md); the cost is a connect delay for bursts of new connections beyond it."
        ),
    )
    gc_young_threshold: int = Field(
        default=50_000,
        ge=0,
        description=(
            "Python's cyclic garbage collector runs on the young generation once allocations minus "
            "deallocations pass this (Python's default: 700). Under load a collection at 700 walks "
            "every live object born since the last one and pauses the event loop 40-115 ms; at "
            "50,000 the server ran 6-7 collections instead of ~3,500 per 24 s run, the longest "
            "37 ms (docs/RELIABILITY.md). Bounds the cyclic garbage kept to about that many objects. "
            "0: Python's default."
        ),
    )
    shutdown_timeout_s: float = Field(
        default=30.0, gt=0.0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the server and uvicorn."
    )
    # Live monitoring (service/monitoring.py, docs/MONITORING.md "Drift alarm", "Shadow teacher")
    drift_delta: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="Drift alarm at martingale 1/delta: P(false alarm) <= delta per run-to-alarm.",
    )
    shadow_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Fraction of served rows also run through the package's ensemble.onnx, off the "
        "answer path (0 = off).",
    )
    shadow_window: int = Field(
        default=1000, ge=10, description="Rows in the shadow teacher's rolling fidelity window."
    )
    shadow_queue_size: int = Field(
        default=16, ge=1, description="Sampled batches the shadow queue holds; beyond it rows are dropped."
    )
    shadow_min_batch: int = Field(
        default=64,
        ge=1,
        description="Rows the shadow worker gathers from its queue into one ensemble run (waiting at "
        "most 1 s for them): a large ensemble costs nearly as much for 1 row as for 64.",
    )
    shadow_max_busy: float = Field(
        default=0.05,
        gt=0.0,
        le=1.0,
        description="Largest share of one core the shadow worker keeps busy (per model version and "
        "worker process): after a run of t s it rests t x (1/max_busy - 1); samples wait meanwhile, a "
        "full queue drops them (counted).",
    )

    @field_validator("model_versions")
    @classmethod
    def _valid_pins(cls, pins: dict[str, int]) -> dict[str, int]:
        import re

        for name, version in pins.items():
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"invalid model name {name!r} in model_versions")
            if version < 1:
                raise ValueError(f"pinned version of {name!r} must be >= 1, got {version}")
        return pins

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # HYDRA_API_KEY= (empty) in a compose file means "no key", not "the empty key".
        return None if value in ("", None) else value

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.cors_allow_origins.split(",") if origin.strip()]

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

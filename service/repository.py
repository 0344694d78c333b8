"""The model repository: `<root>/<name>/<version>/` directories → served models, with safe reloads.

Each model serves one version: the pinned one (`Settings.model_versions`) or the highest number.
`load(name)` builds and warms the new version completely before it replaces the old one; new lookups
get the new version, while requests that reached (or looked up) the old one are answered by it — it
keeps serving for a grace period, then drains and stops — so a reload fails no request. A version
that fails to load is refused and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from service.errors import ModelLoadError, ModelNotFound
from service.metrics import ServiceMetrics
from service.served_model import ServedModel
from service.settings import MODEL_NAME_PATTERN, Settings

logger = logging.getLogger(__name__)

_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")

__all__ = ["ModelRepository", "NoLoadableModel", "ServedModel"]


class NoLoadableModel(RuntimeError):
    """Start-up found nothing it could serve; the message lists what was tried and why it failed."""


def check_model_name(name: str) -> str:
    # also the path-traversal guard: the pattern admits no '/', '\\' and no leading '.'
    if not _NAME.fullmatch(name):
        raise ModelNotFound(f"invalid model name {name!r}")
    return name


class ModelRepository:
    """Served models by name. Lives on `app.state.repository`; started and stopped by the lifespan."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.root = settings.model_repository
        self._settings = settings
        self._metrics = metrics
        self._models: dict[str, ServedModel] = {}
        self._errors: dict[str, str] = {}  # last load failure per model name, shown by index()
        # Versions exported as not ready because they failed to load and nothing else serves the name:
        # hydra_model_ready == 0 is what the HydraModelNotReady alert watches.
        self._unready: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Replaced versions still answering requests that looked them up before the swap.
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        # Longest gap between a route's lookup and its submit: reading the body is bounded by this.
        self._retire_grace_s = settings.request_read_timeout_s + 1.0
        # One worker of several (service.worker_group): a client's load/unload is announced to the
        # other workers (the call returns once they have applied it), and their readiness counts.
        self.announce: Callable[[Literal["load", "unload"], str], Awaitable[None]] | None = None
        self.workers_not_ready: Callable[[], list[int]] | None = None

    # ---- lookup ------------------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded (known: {sorted(self._models) or 'none'})")
        if version is not None and version != model.version:
            raise ModelNotFound(
                f"model {name!r} version {version} is not loaded (serving version {model.version})"
            )
        return model

    def models(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.ready]

    @property
    def ready(self) -> bool:
        return bool(self.models())

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model directory, its version, and its state."""
        names = set(self._candidate_names()) | set(self._models)
        out: list[dict[str, Any]] = []
        for name in sorted(names):
            model = self._models.get(name)
            if model is not None:
                out.append({"name": name, "version": str(model.version), "state": "READY", "reason": ""})
                continue
            try:
                version: str = str(self._pick_version(name))
            except ModelNotFound:
                version = ""
            out.append(
                {
                    "name": name,
                    "version": version,
                    "state": "UNAVAILABLE",
                    "reason": self._errors.get(name, "unloaded"),
                }
            )
        return out

    # ---- directory layout -------------------------------------------------------------------------
    def _candidate_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def _pick_version(self, name: str) -> int:
        directory = self.root / check_model_name(name)
        if not directory.is_dir():
            raise ModelNotFound(f"model {name!r} not found in repository {self.root}")
        pinned = self._settings.model_versions.get(name)
        versions = sorted(
            int(p.name) for p in directory.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)
        )
        if pinned is not None:
            if pinned not in versions:
                raise ModelNotFound(
                    f"model {name!r}: pinned version {pinned} not in {directory} (has {versions})"
                )
            return pinned
        if not versions:
            raise ModelNotFound(f"model {name!r} has no version directories (1, 2, …) in {directory}")
        return versions[-1]

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model in the repository; raise NoLoadableModel when none could be served."""
        if not self.root.is_dir():
            raise NoLoadableModel(f"model repository {str(self.root)!r} is not a directory")
        names = self._candidate_names()
        problems: list[str] = []
        for name in names:
            try:
                await self.load(name, announce=False)
            except (ModelLoadError, ModelNotFound) as exc:
                problems.append(exc.message)
                logger.error("not serving %s: %s", name, exc.message)
        if not self._models:
            detail = "; ".join(problems) if problems else "no <name>/<version>/ directories found"
            raise NoLoadableModel(f"no loadable model in repository {str(self.root)!r}: {detail}")

    async def stop(self) -> None:
        """Drain and stop every model, retiring ones included (queued requests are answered first)."""
        self._closing.set()  # retiring versions stop now instead of at the end of their grace period
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(m.stop() for m in models), *self._retiring)

    async def apply(self, op: Literal["load", "unload"], name: str) -> None:
        """Do what another worker announced (not announced again)."""
        if op == "load":
            await self.load(name, announce=False)
        else:
            with contextlib.suppress(ModelNotFound):  # not loaded here: nothing to unload
                await self.unload(name, announce=False)

    async def load(self, name: str, *, announce: bool = True) -> ServedModel:
        """(Re)load `name` at its pinned/latest version; the old version serves until the new one is
        warm. `announce`: other workers (if any) load it too before this returns."""
        model = await self._load(name)
        if announce and self.announce is not None:
            await self.announce("load", name)
        return model

    async def _load(self, name: str) -> ServedModel:
        check_model_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            version = self._pick_version(name)
            directory = self.root / name / str(version)
            try:
                model = await asyncio.to_thread(ServedModel.load, directory, self._settings, self._metrics)
            except ModelLoadError as exc:
                self._errors[name] = exc.message
                self._metrics.inc_load_failure(name, exc.reason)
                if name not in self._models:  # an old version still serving keeps the name ready
                    self._mark_unready(name, str(version))
                raise
            await model.start()
            old = self._models.get(name)
            # the swap is one dict assignment on the event loop: every request sees old or new, never none
            self._models[name] = model
            self._errors.pop(name, None)
            failed = self._unready.pop(name, None)
            if failed is not None and failed != str(model.version):
                self._metrics.remove_model(name, failed)
            self._metrics.set_model_info(
                name,
                str(model.version),
                model.manifest.heads,
                model.provider,
                model.default_alpha,
                has_density=model.manifest.has_density,
                has_input_density=model.manifest.has_input_density,
                has_unseen_values=model.manifest.has_unseen_values,
            )
            self._metrics.set_model_ready(name, str(model.version), True)
            logger.info("serving %s version %s on %s", name, model.version, model.provider)
            if old is not None:
                if old.version != model.version:
                    self._metrics.set_model_ready(name, str(old.version), False)
                retiring = asyncio.create_task(self._retire(old, model.version), name=f"retire-{name}")
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
            return model

    def _mark_unready(self, name: str, version: str) -> None:
        previous = self._unready.get(name)
        if previous is not None and previous != version:
            self._metrics.remove_model(name, previous)
        self._unready[name] = version
        self._metrics.set_model_ready(name, version, False)

    async def _retire(self, old: ServedModel, new_version: int) -> None:
        """Stop a replaced version once no request can still be on its way to it.

        A route may look a model up and submit only later (the V2 route reads and decodes the body
        after its lookup), so for `retire_grace_s` the old version keeps answering what reaches it —
        correctly labelled with its own version — then drains its queue and stops.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), self._retire_grace_s)
        await old.stop()
        if old.version != new_version:
            self._metrics.remove_model(old.name, str(old.version))
        logger.info("retired %s version %s", old.name, old.version)

    async def unload(self, name: str, *, announce: bool = True) -> None:
        await self._unload(name)
        if announce and self.announce is not None:
            await self.announce("unload", name)

    async def _unload(self, name: str) -> None:
        check_model_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self._models.pop(name, None)
            if model is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            self._errors[name] = "unloaded"
            await model.stop()
            self._metrics.remove_model(name, str(model.version))
            logger.info("unloaded %s version %s", name, model.version)

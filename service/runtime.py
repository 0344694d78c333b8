"""One ONNX Runtime session per served model: provider choice, graph checks, warm-up, blocking run.

`run()` blocks (ORT releases the GIL while it computes); the batcher calls it from a worker thread,
never from the event loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.errors import ModelLoadError, ProviderUnavailable
from service.gpu import cuda_unavailable_reason
from service.manifest import ModelManifest
from service.settings import Settings

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


ProviderSpec = str | tuple[str, dict[str, str]]

# The batcher forms any batch up to max_batch_size; warm-up covers the powers of two up to it (and
# the full batch) so kernel selection and arena growth happen before traffic, bounded in rows.
WARMUP_MAX_ROWS = 1024


def choose_providers(
    preference: str,
    available: list[str] | None = None,
    cuda_options: dict[str, str] | None = None,
) -> list[ProviderSpec]:
    """ORT providers in priority order for `auto|cuda|cpu` (cuda needs onnxruntime-gpu).

    `available` defaults to `ort.get_available_providers()`; CUDA gets `cuda_options` when given.
    """
    available = ort.get_available_providers() if available is None else available
    cuda: ProviderSpec = (CUDA, cuda_options) if cuda_options else CUDA
    if preference == "cpu":
        return [CPU]
    if preference == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                f"execution_providers=cuda but ONNX Runtime offers only {available} "
                "(install onnxruntime-gpu)",
                reason="provider",
            )
        return [cuda, CPU]
    return [cuda, CPU] if CUDA in available else [CPU]


def check_provider(preference: str, requested: list[ProviderSpec], session_providers: list[str]) -> str:
    """The provider a session really runs on; refuse it when CUDA was required and did not come up.

    onnxruntime-gpu lists CUDA as available even when its CUDA/cuDNN libraries are missing, and then
    builds the session on CPU: only the session's own provider list tells.
    """
    got = session_providers[0]
    wanted = [p if isinstance(p, str) else p[0] for p in requested]
    if got == wanted[0]:
        return got
    if preference == "cuda":
        raise ProviderUnavailable(
            f"session came up on {got} although CUDA was requested "
            f"(execution_providers=cuda): {cuda_unavailable_reason()}"
        )
    logger.warning(
        "execution_providers=%s: CUDA did not come up, serving on %s (%s)",
        preference,
        got,
        cuda_unavailable_reason(),
    )
    return got


def cuda_provider_options(settings: Settings) -> dict[str, str]:
    """CUDA provider options from the settings (ORT takes them as strings).

    HEURISTIC conv search: ORT's default (EXHAUSTIVE) benchmarks every cuDNN algorithm at each new
    input shape, a latency spike at every batch size the batcher forms for the first time. TF32 off
    by default: it changes float32 matmuls by about 1e-3 relative.
    """
    return {
        "device_id": str(settings.cuda_device_id),
        "cudnn_conv_algo_search": settings.cuda_conv_algo_search,
        "use_tf32": "1" if settings.cuda_use_tf32 else "0",
    }


def warmup_batch_sizes(max_batch_size: int, max_rows: int = WARMUP_MAX_ROWS) -> tuple[int, ...]:
    """1, 2, 4, … up to min(max_batch_size, max_rows), plus that bound itself."""
    top = max(1, min(max_batch_size, max_rows))
    sizes = [1 << k for k in range(top.bit_length()) if 1 << k <= top]
    if sizes[-1] != top:
        sizes.append(top)
    return tuple(sizes)


class OnnxModelRuntime:
    """A checked, warmed `InferenceSession` for one model package."""

    def __init__(self, model_path: Path, manifest: ModelManifest, settings: Settings) -> None:
        self.manifest = manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.log_severity_level = 3  # ORT's warnings about unused initialisers are noise here
        # ORT's pool threads spin-wait between runs by default; on a few cores that spinning takes
        # the CPU the event loop and the HTTP parsing need (the batch runs are short).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        preference = settings.execution_providers
        requested = choose_providers(preference, cuda_options=cuda_provider_options(settings))
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options, providers=requested)
        except ModelLoadError:
            raise
        except Exception as exc:  # ORT raises several unrelated types for unreadable graphs
            raise ModelLoadError(f"ONNX Runtime cannot load {model_path.name}: {exc}", reason="onnx") from exc
        self.provider: str = check_provider(preference, requested, self._session.get_providers())
        self._output_names = self._expected_outputs()
        self._check_graph()

    def _expected_outputs(self) -> list[str]:
        names = self.manifest.outputs
        if self.manifest.task == "classification":
            assert names.log_probs is not None
            found = [names.log_probs]
        else:
            assert names.mean is not None and names.variance is not None
            found = [names.mean, names.variance]
        return found + [n for n in (names.density, names.input_density, names.unseen_values) if n is not None]

    def _check_graph(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        spec = self.manifest.input
        if spec.name not in inputs:
            raise ModelLoadError(f"graph has no input {spec.name!r} (inputs: {sorted(inputs)})")
        graph_shape = inputs[spec.name].shape
        if len(graph_shape) != len(spec.shape):
            raise ModelLoadError(
                f"graph input rank {len(graph_shape)} != manifest shape {spec.shape}", reason="manifest"
            )
        for dim_graph, dim_manifest in zip(graph_shape[1:], spec.shape[1:], strict=True):
            if isinstance(dim_graph, int) and dim_graph != dim_manifest:
                raise ModelLoadError(
                    f"graph input shape {graph_shape} != manifest shape {spec.shape}", reason="manifest"
                )
        if inputs[spec.name].type != "tensor(float)":
            raise ModelLoadError(f"graph input must be float32, got {inputs[spec.name].type}")
        missing = [n for n in self._output_names if n not in outputs]
        if missing:
            raise ModelLoadError(
                f"graph lacks outputs {missing} named by the manifest (outputs: {sorted(outputs)})",
                reason="manifest",
            )

    def run(self, rows: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """Raw graph outputs for `rows` (batch, *row_shape) float32, keyed by manifest role."""
        if self.provider == CUDA:
            # IO binding: the input goes to the device once, outputs come back once, no extra staging.
            binding = self._session.io_binding()
            binding.bind_cpu_input(self.manifest.input.name, rows)
            for name in self._output_names:
                binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self._session.run(self._output_names, {self.manifest.input.name: rows})
        roles = ["log_probs"] if self.manifest.task == "classification" else ["mean", "variance"]
        if self.manifest.has_density:
            roles.append("density")
        if self.manifest.has_input_density:
            roles.append("input_density")
        if self.manifest.has_unseen_values:
            roles.append("unseen_values")
        return {role: np.asarray(v, dtype=np.float32) for role, v in zip(roles, values, strict=True)}

    @property
    def provider_options(self) -> dict[str, dict[str, str]]:
        """ORT's view of the options of each provider the session runs on."""
        options: dict[str, dict[str, str]] = self._session.get_provider_options()
        return options

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run zero inputs through the graph and check the output shapes against the manifest.

        The first run allocates ORT's arena and picks kernels; doing it here keeps it off the first
        client's latency and refuses a graph whose outputs do not match the manifest.
        """
        m = self.manifest
        for n in batch_sizes:
            raw = self.run(np.zeros((n, *m.row_shape), dtype=np.float32))
            if m.task == "classification":
                expected: tuple[int, ...] = (n, m.heads, m.num_classes or 0)
                got = raw["log_probs"].shape
                if got != expected:
                    raise ModelLoadError(f"log_probs shape {got} != (batch, heads, classes) = {expected}")
            else:
                for key in ("mean", "variance"):
                    if raw[key].shape != (n, m.heads):
                        raise ModelLoadError(
                            f"{key} shape {raw[key].shape} != (batch, heads) = {(n, m.heads)}"
                        )
            for role in ("density", "input_density", "unseen_values"):
                if role in raw and raw[role].shape != (n,):
                    raise ModelLoadError(f"{role} shape {raw[role].shape} != (batch,) = {(n,)}")
            if any(np.isnan(v).any() for v in raw.values()):
                raise ModelLoadError("warm-up produced NaN outputs on a zero input")
        # A graph can be finite on zeros and NaN elsewhere (a Log or Sqrt of a feature, a NaN weight
        # that a zero input multiplies away): probe seeded standard-normal rows too.
        probe = np.random.default_rng(0).standard_normal((8, *m.row_shape)).astype(np.float32)
        if any(np.isnan(v).any() for v in self.run(probe).values()):
            raise ModelLoadError("warm-up produced NaN outputs on standard-normal inputs")
        logger.debug("warmed %s on %s", m.name, self.provider)

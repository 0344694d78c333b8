"""Part 2 end to end on the shipped digits package, with tiny timings (real ORT, real graphs)."""

from __future__ import annotations

import pytest

from bench.cost import run_cost
from bench.workloads import Workload, digits


def test_cost_of_the_shipped_model() -> None:
    w = digits()
    result = run_cost([w], batches=(1, 8), seconds=0.05)["workloads"]["digits"]
    flops = result["flops_per_row"]
    # the ensemble is M members' worth of FLOPs; Hydra is one body plus M small heads
    assert flops["ensemble"] > 5 * flops["hydra"] > 5 * flops["member"]
    assert result["flop_ratio_ensemble_over_hydra"] == pytest.approx(
        flops["ensemble"] / flops["hydra"], rel=1e-3
    )
    for cell in result["cells"]:
        timings = cell["timings"]
        assert set(timings) == {"hydra", "ensemble", "member"}
        assert all(t["calls"] > 0 and t["rows_per_s"] > 0 for t in timings.values())
        assert cell["speedup_vs_ensemble"] == pytest.approx(
            timings["hydra"]["rows_per_s"] / timings["ensemble"]["rows_per_s"], rel=1e-2
        )
        assert (
            cell["target_met"] == (cell["speedup_over_flop_ratio"] >= 0.9 - 1e-3)
            or abs(cell["speedup_over_flop_ratio"] - 0.9) < 1e-3
        )


def test_member_graph_is_cut_once_and_reused() -> None:
    w = digits()
    path = w.ensure_member()
    mtime = path.stat().st_mtime
    assert Workload(w.name, w.repository).ensure_member().stat().st_mtime == mtime


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_cuda_asked_and_cpu_came_up_stops_the_benchmark() -> None:
    import onnxruntime as ort

    from bench.ort_timing import make_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    # the CPU wheel, asked for CUDA, builds the session on CPU as onnxruntime-gpu does without its
    # CUDA libraries: publishing those numbers as GPU numbers is what must not happen
    with pytest.raises(
        SystemExit, match="CUDAExecutionProvider was requested but the session came up on CPU"
    ):
        make_session(digits().graphs["hydra"], "CUDAExecutionProvider")
    with pytest.raises(SystemExit, match="came up on CPU"):
        run_cost([digits()], batches=(1,), seconds=0.01, provider="CUDAExecutionProvider", io_binding=True)

"""Security properties on a real server (in this process where sockets do not matter) and in the source.

- API key: optional for prediction routes, mandatory for repository load/unload, compared with
  `hmac.compare_digest`, and never written to the log (checked on a debug-level server log after
  right, wrong and look-alike keys), to /metrics, or echoed in an error.
- Inputs never reach pickle, eval/exec or a shell: no such import or call anywhere in service/.
- Model files are ONNX + JSON from the configured repository only: names and versions that try to
  leave it (`../`, absolute paths, percent-encoded and double-encoded forms, NUL, backslashes) are
  refused, and a valid package placed just outside the repository cannot be loaded through them.
  A package carrying a pickle next to its ONNX file is served without the pickle ever being read.
- CORS is off unless configured, and then allows only the configured origins.
"""

from __future__ import annotations

import ast
import asyncio
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.http_load import Connection
from tests.reliability.checks import is_error_body
from tests.service.support import (
    CLF_FEATURES,
    REPO_ROOT,
    InProcessClient,
    Server,
    in_process,
    running_server,
    write_model,
)

SERVICE = REPO_ROOT / "service"
KEY = "Zk9-very-secret-api-key-4d1f"
ROW = {"instances": [[0.5] * CLF_FEATURES]}


def _raw(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send `path` byte for byte (httpx would normalise dot segments and re-encode)."""

    async def go() -> tuple[int, bytes]:
        connection = Connection(url)
        try:
            status, _, body = await connection.request(method, path, b"", headers)
            return status, body
        finally:
            await connection.close()

    return asyncio.run(go())


# ---- API key ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("keyed") / "models"
    shutil.copytree(model_repository, repo)
    with running_server(repo, api_key=KEY, log_level="debug") as server:
        yield server


def test_api_key_required_on_prediction_when_set_and_always_on_load(
    keyed: Server, model_repository: Path
) -> None:
    url = keyed.url
    look_alike = KEY[:-1] + "X"
    for path in ("/v1/models/clf:predict", "/v2/models/clf/infer"):
        body = (
            ROW
            if "v1" in path
            else {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, CLF_FEATURES],
                        "datatype": "FP32",
                        "data": [0.5] * CLF_FEATURES,
                    }
                ]
            }
        )
        assert httpx.post(url + path, json=body).status_code == 401
        assert httpx.post(url + path, json=body, headers={"X-API-Key": look_alike}).status_code == 401
        assert (
            httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        )
    for action in ("load", "unload"):
        refused = httpx.post(f"{url}/v2/repository/models/reg/{action}", headers={"X-API-Key": look_alike})
        assert refused.status_code == 401 and is_error_body(refused.content)
        assert KEY not in refused.text and look_alike not in refused.text
    assert httpx.post(f"{url}/v2/repository/models/reg/load", headers={"X-API-Key": KEY}).status_code == 200
    # without a configured key prediction is open and repository control is off
    with in_process(model_repository) as open_server:
        assert open_server.post("/v1/models/clf:predict", json=ROW).status_code == 200
        off = open_server.post("/v2/repository/models/clf/load", headers={"X-API-Key": KEY})
        assert off.status_code == 403 and is_error_body(off.content)


def test_health_and_docs_need_no_key_when_one_is_set(keyed: Server) -> None:
    # probes (kubelet, KServe's SDK) and a browser opening the docs carry no key
    assert httpx.get(f"{keyed.url}/").json() == {"status": "alive"}
    for path in ("/v2/health/live", "/v2/health/ready", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(keyed.url + path).status_code == 200, path


def test_api_key_is_never_logged_or_exposed(keyed: Server) -> None:
    url = keyed.url
    attempts = [KEY, KEY[:-1] + "X", KEY + "extra", "wrong"]
    for key in attempts:
        httpx.post(f"{url}/v1/models/clf:predict", json=ROW, headers={"X-API-Key": key})
        httpx.post(f"{url}/v2/repository/models/nope/load", headers={"Authorization": f"Bearer {key}"})
        httpx.post(f"{url}/v1/models/clf:predict", content=b"{broken", headers={"X-API-Key": key})
    metrics = httpx.get(f"{url}/metrics").text
    openapi = httpx.get(f"{url}/openapi.json").text
    log = keyed.log()
    assert "DEBUG" in log or "debug" in log.lower() or "INFO" in log  # the log is really being written
    for secret in attempts:
        assert secret not in log, f"{secret!r} in the server log"
        assert secret not in metrics and secret not in openapi


def test_key_comparison_is_constant_time_in_the_source() -> None:
    tree = ast.parse((SERVICE / "auth.py").read_text())
    calls = {
        f"{node.func.value.id}.{node.func.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
    }
    assert "hmac.compare_digest" in calls
    # no == / != on anything key-like: an early-exit string compare leaks the key's prefix by timing
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
                n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            }
            assert not names & {"key", "presented", "expected", "api_key", "token"}, ast.unparse(node)


# ---- no pickle / eval / shell -------------------------------------------------------------------------

FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "joblib",
    "subprocess",
    "pty",
    "ctypes",
}
FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "os.system",
    "os.popen",
    "os.exec",
    "yaml.load",
    "yaml.unsafe_load",
}


def test_service_code_has_no_pickle_eval_or_shell() -> None:
    problems = []
    for path in sorted(SERVICE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                )
                problems += [f"{where} imports {m}" for m in modules if m.split(".")[0] in FORBIDDEN_MODULES]
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in FORBIDDEN_CALLS or name.startswith("os.exec") or name.startswith("os.spawn"):
                    problems.append(f"{where} calls {name}")
                if any(k.arg == "allow_pickle" and ast.unparse(k.value) != "False" for k in node.keywords):
                    problems.append(f"{where} allows pickle")
    assert not problems, problems


def test_a_pickle_beside_the_model_is_never_read(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-was-loaded"

    class Bomb:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    write_model(tmp_path / "models", "clf", 1, "classification")
    for name in ("model.pkl", "model.pickle", "model.joblib"):
        (tmp_path / "models" / "clf" / "1" / name).write_bytes(pickle.dumps(Bomb()))
    with in_process(tmp_path / "models") as server:  # the service's loading code, in this process
        assert server.post("/v1/models/clf:predict", json=ROW).status_code == 200
    assert not marker.exists()


# ---- path traversal -----------------------------------------------------------------------------------

TRAVERSAL_NAMES = [
    "..",
    "%2e%2e",
    "%2E%2E",
    "..%2Foutside",
    "%2e%2e%2foutside",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%252e%252e%252foutside",  # double-encoded
    "%2Fetc%2Fpasswd",  # absolute
    "%2Ftmp",
    "..%5Coutside",  # backslash
    "clf%00",
    "clf%2F..%2F..%2Foutside",
    ".hidden",
    "~root",
]
TRAVERSAL_VERSIONS = [
    "..",
    "%2e%2e",
    "1%2F..%2F..",
    "%2F1",
    "-1",
    "0",
    "1.0",
    "%31%00",
    "%EF%BC%91",
]  # last: fullwidth digit one


@pytest.fixture(scope="module")
def traversal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    base = tmp_path_factory.mktemp("traversal")
    write_model(base / "repo", "clf", 1, "classification")
    # a valid package just outside the repository, and one at the filesystem-absolute-looking path
    write_model(base, "outside", 1, "classification")
    with running_server(base / "repo", api_key=KEY) as server:
        yield server, base


def test_traversal_in_model_names_and_versions_is_refused(traversal: tuple[Server, Path]) -> None:
    server, _ = traversal
    auth = {"X-API-Key": KEY}
    answered = []
    for name in TRAVERSAL_NAMES:
        for method, path in (
            ("POST", f"/v2/repository/models/{name}/load"),
            ("POST", f"/v2/repository/models/{name}/unload"),
            ("GET", f"/v2/models/{name}"),
            ("GET", f"/v2/models/{name}/ready"),
            ("POST", f"/v2/models/{name}/infer"),
            ("GET", f"/v1/models/{name}"),
            ("POST", f"/v1/models/{name}:predict"),
        ):
            status, body = _raw(server.url, method, path, auth)
            answered.append((method, path, status))
            assert status in (400, 404, 405), (method, path, status, body)
            assert is_error_body(body), (path, body)
    for version in TRAVERSAL_VERSIONS:
        for method, path in (
            ("GET", f"/v2/models/clf/versions/{version}"),
            ("GET", f"/v2/models/clf/versions/{version}/ready"),
            ("POST", f"/v2/models/clf/versions/{version}/infer"),
        ):
            status, body = _raw(server.url, method, path, auth)
            answered.append((method, path, status))
            assert status in (400, 404), (method, path, status, body)
            assert is_error_body(body)
    index = httpx.get(f"{server.url}/v2/repository/index", headers=auth).json()
    assert [entry["name"] for entry in index] == ["clf"]  # "outside" never became a model
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": ["clf"]}
    assert len(answered) == 7 * len(TRAVERSAL_NAMES) + 3 * len(TRAVERSAL_VERSIONS)


def test_literal_dot_segments_do_not_escape_the_routes(traversal: tuple[Server, Path]) -> None:
    server, _ = traversal
    for path in (
        "/v2/repository/models/../outside/load",
        "/v2/repository/models/../../outside/load",
        "/v2/models/clf/../../repository/models/outside/load",
        "//etc/passwd",
        "/v2/models/clf/versions/1/../../../../outside",
    ):
        status, body = _raw(server.url, "POST", path, {"X-API-Key": KEY})
        assert status in (400, 404, 405), (path, status, body)
        assert is_error_body(body)
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": ["clf"]}


# ---- CORS -----------------------------------------------------------------------------------------


def _preflight(client: InProcessClient, origin: str) -> httpx.Response:
    return client.request(
        "OPTIONS",
        "/v1/models/clf:predict",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key",
        },
    )


def test_cors_is_off_unless_configured(model_repository: Path) -> None:
    with in_process(model_repository) as server:
        preflight = _preflight(server, "https://evil.example")
        assert not any(h.startswith("access-control-") for h in preflight.headers)
        simple = server.post("/v1/models/clf:predict", json=ROW, headers={"Origin": "https://evil.example"})
        assert simple.status_code == 200
        assert not any(h.startswith("access-control-") for h in simple.headers)
    with in_process(
        model_repository, cors_allow_origins="https://app.example, https://ops.example"
    ) as server:
        allowed = _preflight(server, "https://app.example")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        refused = _preflight(server, "https://evil.example")
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        simple = server.post("/v1/models/clf:predict", json=ROW, headers={"Origin": "https://ops.example"})
        assert (
            simple.status_code == 200
            and simple.headers["access-control-allow-origin"] == "https://ops.example"
        )

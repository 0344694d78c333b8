"""The container runs as a non-root user with the model directory read-only.

Statically (there is no Docker engine on the build machines): every image stage that runs the
server ends as user 10001, no later stage switches back to root, the model directory is created
and filled by root without --chown/chmod (so 10001 cannot write it), and docker-compose runs the
container with a read-only root filesystem. tests/deploy checks the Kubernetes side.

Behaviourally: the server started as uid 10001 (setpriv, as the image's USER does) over a
root-owned, read-only repository loads, serves and reloads — it never needs to write there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.service.support import CLF_FEATURES, REPO_ROOT, Server, free_port, wait_ready

DOCKERFILE = REPO_ROOT / "Dockerfile"
INSTALL_SCRIPT = REPO_ROOT / "deploy" / "image" / "install-service.sh"
UID = 10001


def _stages(text: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    stages: dict[str, str] = {}
    for i in range(1, len(parts), 3):
        base, name, body = parts[i], parts[i + 1], parts[i + 2]
        stages[name or base] = f"FROM {base}\n{body}"
    return stages


def test_images_run_as_non_root_and_cannot_write_the_models() -> None:
    stages = _stages(DOCKERFILE.read_text())
    parents = {name: body.split("\n", 1)[0].split()[1] for name, body in stages.items()}

    def effective_user(name: str) -> str | None:
        users = re.findall(r"^USER\s+(\S+)", stages[name], re.MULTILINE)
        if users:
            return users[-1]
        return effective_user(parents[name]) if parents[name] in stages else None

    for name in ("runtime-cpu", "bundled", "gpu", "cpu"):
        assert effective_user(name) == f"{UID}:{UID}", f"stage {name} runs as {effective_user(name)}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"^USER\s+(root|0)\b", text, re.MULTILINE)
    # the stages create /models in the install script they share (run as root, before USER)
    script = INSTALL_SCRIPT.read_text()
    assert re.search(r"^mkdir -p /models$", script, re.MULTILINE)
    assert not re.search(r"--chown[^\n]*models|chown[^\n]*/models|chmod[^\n]*/models", text + script)
    assert re.search(r"^COPY models/ /models/$", stages["bundled"], re.MULTILINE)
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["hydra-serve"]
    assert service.get("read_only") is True
    assert not any(":rw" in str(v) for v in service.get("volumes", []))


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop to uid 10001"
)
def test_server_as_uid_10001_serves_from_a_read_only_repository(model_repository: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="ro-models-"))
    os.chmod(root, 0o755)
    repo = root / "models"
    shutil.copytree(model_repository, repo)
    for path in [repo, *repo.rglob("*")]:
        os.chown(path, 0, 0)
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    port = free_port()
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    env.update({"HYDRA_API_KEY": "container-test-key", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(root)})
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", sys.executable, "-m", "service",
             "--host", "127.0.0.1", "--port", str(port), "--model-repository", str(repo),
             "--grpc-port", str(free_port())],
            cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server)
        status = Path(f"/proc/{process.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.MULTILINE), status
        rows = {"instances": [[0.5] * CLF_FEATURES]}
        auth = {"X-API-Key": "container-test-key"}
        predicted = httpx.post(f"{server.url}/v1/models/clf:predict", json=rows, headers=auth, timeout=10)
        assert predicted.status_code == 200
        reload = httpx.post(f"{server.url}/v2/repository/models/clf/load", headers=auth, timeout=30)
        assert reload.status_code == 200, reload.text
        # the user really cannot write the repository
        probe = subprocess.run(
            [
                "setpriv",
                f"--reuid={UID}",
                f"--regid={UID}",
                "--clear-groups",
                "touch",
                str(repo / "clf" / "x"),
            ],
            capture_output=True,
        )
        assert probe.returncode != 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        for path in [repo, *repo.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root, ignore_errors=True)

"""promtool on deploy/prometheus: the rules parse, their unit tests pass, the compose config is valid."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.support import ALERTS, ALERTS_TEST, COMPOSE_PROMETHEUS_CONFIG, alert_rules, require_binary


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    import yaml

    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no case where it stays quiet"


def test_alert_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: raise the OOD threshold out of reach and they must."""
    broken = ALERTS.read_text().replace("> 3.09", "> 1e9")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST.read_text())
    result = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0
    assert "HydraOODFlagRateHigh" in result.stdout + result.stderr


def test_compose_prometheus_config_is_valid() -> None:
    # also checks the rule files it names (alerts.yml, relative to the config)
    result = promtool("check", "config", COMPOSE_PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout

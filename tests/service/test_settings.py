"""Settings come from HYDRA_* variables and command-line flags (flags win); bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import cli_source, settings_from_args
from service.settings import Settings


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("HYDRA_PORT", "9001")
    monkeypatch.setenv("HYDRA_MODEL_VERSIONS", '{"digits": 1}')
    monkeypatch.setenv("HYDRA_API_KEY", "key-from-env")
    settings = settings_from_args(
        ["--port", "9100", "--model-repository", "/srv/models", "--default-alpha", "0.01"]
    )
    assert settings.max_batch_size == 16 and settings.port == 9100
    assert settings.model_repository == Path("/srv/models") and settings.default_alpha == 0.01
    assert settings.model_versions == {"digits": 1}
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "key-from-env"
    assert "key-from-env" not in repr(settings)  # the key never shows in logs


def test_pins_from_flags_and_empty_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_API_KEY", "")
    settings = settings_from_args(["--pin", "digits=3", "--pin", "clf=1", "--execution-providers", "cpu"])
    assert settings.model_versions == {"digits": 3, "clf": 1}
    assert settings.api_key is None and settings.execution_providers == "cpu"


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-batch-size", "0"],
        ["--execution-providers", "tpu"],
        ["--default-alpha", "1.5"],
        ["--max-queue-delay-ms", "-1"],
        ["--pin", "digits"],
        ["--pin", "../x=1"],
    ],
)
def test_bad_values_are_refused_with_a_message(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        settings_from_args(argv)
    assert info.value.code != 0


def test_every_setting_is_documented_and_has_a_flag() -> None:
    assert all(field.description for field in Settings.model_fields.values())
    help_text = cli_source().root_parser.format_help()
    flags = {f"--{name.replace('_', '-')}" for name in Settings.model_fields}
    assert all(flag in help_text for flag in flags | {"--pin"})

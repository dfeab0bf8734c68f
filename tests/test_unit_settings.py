"""Unit tests of settings.py: sources, precedence, parsing and the auth token."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from pgturso.common import settings as settings_module
from pgturso.common.errors import ConfigError
from pgturso.common.settings import BY_NAME, SETTINGS, Settings, resolve


def test_every_setting_is_a_settings_field_and_vice_versa() -> None:
    values = [f.name for f in fields(Settings) if f.name != "sources"]
    assert [s.name for s in SETTINGS] == values
    assert set(BY_NAME) == set(values)


def test_setting_names() -> None:
    setting = BY_NAME["max_request_bytes"]
    assert (setting.guc, setting.env, setting.flag) == (
        "pgturso.max_request_bytes",
        "PGTURSO_MAX_REQUEST_BYTES",
        "--max-request-bytes",
    )


def test_defaults() -> None:
    s = resolve({}, environ={}, flags={})
    assert s == Settings(
        url=None,  # the default target's default, file:pgturso.db, is applied by the worker
        target="default",
        auth_token=None,
        auth_token_file=None,
        encryption_key=None,
        encryption_key_file=None,
        batch_rows=50_000,
        batch_events=50_000,
        copy_chunk_rows=20_000,
        max_request_bytes=8 << 20,
        max_statement_bytes=1 << 20,
        request_timeout=60.0,
        max_transaction_seconds=2.0,
        idle_wait=5.0,
        retry_base_delay=0.5,
        retry_max_delay=30.0,
        retry_limit=0,
        log_level="info",
        log_format="text",
        tls_ca_file=None,
        metrics_port=0,
        metrics_host="127.0.0.1",
        tenant_threads=8,
    )
    assert set(s.sources.values()) == {"default"}


def test_precedence_default_conf_environ_flags() -> None:
    conf = {"pgturso.batch_rows": "5"}
    environ = {"PGTURSO_BATCH_ROWS": "6"}
    flags = {"batch_rows": "7"}
    assert resolve({}, {}, {}).batch_rows == 50_000
    assert resolve(conf, {}, {}).batch_rows == 5
    assert resolve(conf, environ, {}).batch_rows == 6
    assert resolve(conf, environ, flags).batch_rows == 7
    assert resolve({}, {}, flags).batch_rows == 7
    assert resolve({}, environ, {}).batch_rows == 6
    assert resolve(conf, {}, flags).batch_rows == 7


def test_sources_mix_per_setting() -> None:
    s = resolve(
        {"pgturso.url": "http://conf:8080", "pgturso.batch_events": "9", "pgturso.idle_wait": "2.5"},
        {"PGTURSO_URL": "http://env:8080", "PGTURSO_RETRY_LIMIT": "4"},
        {"log_format": "JSON", "batch_events": None},
    )
    assert (s.url, s.batch_events, s.idle_wait, s.retry_limit, s.log_format) == (
        "http://env:8080",
        9,
        2.5,
        4,
        "json",
    )


def test_empty_values_fall_through() -> None:
    s = resolve({"pgturso.batch_rows": ""}, {"PGTURSO_BATCH_ROWS": ""}, {"batch_rows": None})
    assert s.batch_rows == 50_000
    assert resolve({"pgturso.batch_rows": "3"}, {"PGTURSO_BATCH_ROWS": ""}, {}).batch_rows == 3


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGTURSO_BATCH_EVENTS", "12")
    assert resolve({}).batch_events == 12


@pytest.mark.parametrize(
    ("conf", "environ", "flags", "source"),
    [
        ({"pgturso.batch_rows": "0"}, {}, {}, "postgresql.conf pgturso.batch_rows"),
        ({}, {"PGTURSO_BATCH_ROWS": "many"}, {}, "environment PGTURSO_BATCH_ROWS"),
        ({}, {}, {"batch_rows": "-1"}, "flag --batch-rows"),
        # The winning source is the one named, even when a lower one is fine.
        ({"pgturso.batch_rows": "5"}, {"PGTURSO_BATCH_ROWS": "1.5"}, {}, "environment PGTURSO_BATCH_ROWS"),
    ],
)
def test_bad_value_names_its_source(
    conf: dict[str, str], environ: dict[str, str], flags: dict[str, str], source: str
) -> None:
    with pytest.raises(ConfigError, match=f"for batch_rows \\(from {source}\\)"):
        resolve(conf, environ, flags)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("batch_events", "0"),
        ("max_request_bytes", "1e6"),
        ("max_statement_bytes", "-5"),
        ("request_timeout", "0"),
        ("request_timeout", "-1.0"),
        ("request_timeout", "nan"),
        ("idle_wait", "soon"),
        ("retry_base_delay", "0.0"),
        ("retry_max_delay", ""),  # an empty flag is given, so it is parsed
        ("retry_limit", "-1"),
        ("retry_limit", "1.0"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
    ],
)
def test_bad_values_raise(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value {bad!r} for {name} \\(from flag --"):
        resolve({}, {}, {name: bad})


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("retry_limit", "0", 0),
        ("retry_limit", "3", 3),
        ("request_timeout", "0.25", 0.25),
        ("retry_max_delay", "7", 7.0),
        ("log_level", "WARNING", "warning"),
        ("log_level", "Debug", "debug"),
        ("log_format", "json", "json"),
        ("url", "libsql://db.example.turso.io", "libsql://db.example.turso.io"),
        ("max_statement_bytes", " 42 ", 42),
    ],
)
def test_values_are_parsed(name: str, text: str, value: object) -> None:
    parsed = getattr(resolve({}, {}, {name: text}), name)
    assert parsed == value
    assert type(parsed) is type(value)


def test_auth_token_is_ignored_in_postgresql_conf() -> None:
    s = resolve({"pgturso.auth_token": "leaked"}, {}, {})
    assert s.auth_token is None
    assert s.token() is None
    assert "pgturso.auth_token" not in settings_module.POSTGRESQL_CONF_NAMES


def test_auth_token_from_environ_and_flag() -> None:
    assert resolve({}, {"PGTURSO_AUTH_TOKEN": "env-token"}, {}).token() == "env-token"
    assert resolve({}, {"PGTURSO_AUTH_TOKEN": "env-token"}, {"auth_token": "flag-token"}).token() == "flag-token"


def test_token_reads_auth_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  secret-token\n", encoding="utf-8")
    s = resolve({"pgturso.auth_token_file": str(path)}, {}, {})
    assert s.auth_token_file == str(path)
    assert s.token() == "secret-token"


def test_direct_token_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file", encoding="utf-8")
    s = resolve({"pgturso.auth_token_file": str(path)}, {"PGTURSO_AUTH_TOKEN": "direct"}, {})
    assert s.token() == "direct"


def test_empty_token_file_means_no_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n", encoding="utf-8")
    assert resolve({}, {}, {"auth_token_file": str(path)}).token() is None


def test_missing_token_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    s = resolve({}, {}, {"auth_token_file": str(path)})
    with pytest.raises(ConfigError, match=r"cannot read pgturso\.auth_token_file") as info:
        s.token()
    assert str(path) in str(info.value)


def test_token_file_that_is_a_directory_raises_config_error(tmp_path: Path) -> None:
    s = resolve({}, {}, {"auth_token_file": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"cannot read pgturso\.auth_token_file"):
        s.token()


def test_sources_record_where_each_value_came_from() -> None:
    s = resolve({"pgturso.url": "http://conf"}, {"PGTURSO_BATCH_ROWS": "9"}, {"log_level": "debug"})
    assert (s.sources["url"], s.sources["batch_rows"], s.sources["log_level"], s.sources["idle_wait"]) == (
        "postgresql.conf", "environment", "flag", "default")


def test_the_encryption_key_is_a_secret_like_the_token(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    assert not BY_NAME["encryption_key"].in_postgresql_conf
    ignored = resolve({"pgturso.encryption_key": "from-conf"}, environ={}, flags={})
    assert ignored.encryption() is None, "a key in postgresql.conf (SHOW-able by every role) is never used"
    assert resolve({}, environ={"PGTURSO_ENCRYPTION_KEY": "env-key"}, flags={}).encryption() == "env-key"
    assert resolve({"pgturso.encryption_key_file": str(key_file)}, environ={}, flags={}).encryption() == "k3y"
    missing = resolve({}, environ={"PGTURSO_ENCRYPTION_KEY_FILE": str(tmp_path / "nope")}, flags={})
    with pytest.raises(ConfigError, match="encryption_key_file"):
        missing.encryption()

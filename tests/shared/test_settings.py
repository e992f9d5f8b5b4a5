"""Settings refuse unsafe values at start, with a message that says why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.db import Pool, make_engine
from shared.settings import Settings


def test_visibility_timeout_must_exceed_the_job_timeout():
    with pytest.raises(ValidationError, match="would hand a still-running job to a second worker"):
        Settings(job_timeout_s=600, visibility_timeout_s=600)
    assert Settings(job_timeout_s=600).broker_visibility_timeout > 600


def test_database_url_schemes():
    assert Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValidationError, match="sqlite:// or postgresql"):
        Settings(database_url="mysql://u@h/db")


def test_served_model_name(tmp_path):
    folder = tmp_path / "sdxl-turbo-int8"
    folder.mkdir()
    assert Settings(model=str(folder)).served_model_name == "sdxl-turbo-int8"
    assert Settings(model="OpenVINO/sdxl-turbo-int8-ov").served_model_name == "OpenVINO/sdxl-turbo-int8-ov"
    assert Settings(model=str(folder), model_name="xl").served_model_name == "xl"
    with pytest.raises(ValueError, match="SDFLEET_MODEL is not set"):
        Settings().served_model_name
    with pytest.raises(ValidationError, match="not a model name"):
        Settings(model_name="bad name")


def test_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SDFLEET_MAX_ATTEMPTS", "0")
    with pytest.raises(ValidationError, match="max_attempts"):
        Settings()
    monkeypatch.setenv("SDFLEET_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SDFLEET_MODEL", "/models/x")
    assert Settings().max_attempts == 3 and Settings().model == "/models/x"


def test_the_database_pool_settings_reach_a_postgresql_engine(monkeypatch):
    defaults = Settings()
    assert (defaults.db_pool_size, defaults.db_max_overflow, defaults.db_pool_timeout_s) == (5, 5, 10.0)
    monkeypatch.setenv("SDFLEET_DB_POOL_SIZE", "3")
    monkeypatch.setenv("SDFLEET_DB_MAX_OVERFLOW", "2")
    monkeypatch.setenv("SDFLEET_DB_POOL_TIMEOUT_S", "1.5")
    pool = Pool.of(Settings())
    assert pool == Pool(3, 2, 1.5)
    engine = make_engine("postgresql+psycopg://sdfleet@127.0.0.1:9/none", pool)  # made, never connected
    try:
        assert engine.pool.size() == 3 and engine.pool.timeout() == 1.5 and engine.pool._max_overflow == 2
    finally:
        engine.dispose()
    default = make_engine("postgresql+psycopg://sdfleet@127.0.0.1:9/none")
    assert default.pool.size() == 5 and default.pool.timeout() == 10.0 and default.pool._max_overflow == 5
    for name, value in [("SDFLEET_DB_POOL_SIZE", "0"), ("SDFLEET_DB_MAX_OVERFLOW", "-1"),
                        ("SDFLEET_DB_POOL_TIMEOUT_S", "0")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name.removeprefix("SDFLEET_").lower()):
            Settings()
        monkeypatch.delenv(name)

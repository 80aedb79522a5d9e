"""A network that accepts and never answers: Hub ids and upload fail in bounded time, with a
message naming the id and the offline way out; nothing is written. Traffic stays on 127.0.0.1."""

import socket
import threading
import time

import pytest

from mlx_dpo.errors import ConfigError, DataError, HubUnreachable


@pytest.fixture
def stalled_hub(monkeypatch):
    """A local server that accepts connections and never answers; the Hub endpoint points at it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MLX_DPO_HUB_TIMEOUT", "1")
    yield
    stop.set()
    thread.join(timeout=5)
    for c in held:
        c.close()
    server.close()


def bounded(fn, limit=30.0):
    tic = time.monotonic()
    with pytest.raises(Exception) as info:
        fn()
    assert time.monotonic() - tic < limit
    return info.value


def test_a_hub_model_id_fails_in_bounded_time(stalled_hub):
    from mlx_dpo.model.loader import resolve_model_path

    error = bounded(lambda: resolve_model_path("org/tiny-model"))
    assert isinstance(error, ConfigError)
    assert "model: 'org/tiny-model' is no local path" in str(error)
    assert "could not be reached within 1 s" in str(error) and "HF_HUB_OFFLINE=1" in str(error)


def test_a_hub_dataset_id_fails_in_bounded_time(stalled_hub):
    from mlx_dpo.data.sources import resolve_source

    error = bounded(lambda: resolve_source("org/prefs"))
    assert isinstance(error, DataError)
    assert "data: 'org/prefs' is not a local path" in str(error) and "could not be reached" in str(error)


def test_upload_fails_in_bounded_time_and_changes_nothing(stalled_hub, tmp_path):
    from mlx_dpo.export.hub import upload

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    error = bounded(lambda: upload(folder, "me/model"))
    assert isinstance(error, HubUnreachable) and "could not be reached" in str(error)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]

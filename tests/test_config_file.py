"""The user's config file (mtplx.core.config): written atomically, so a process reading it while
another writes (servers and tests sharing MTPLX_CONFIG) sees a whole file, never an empty one."""

from __future__ import annotations

import threading

from mtplx.core.config import read_config, write_config


def test_readers_never_see_a_half_written_config(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(path))
    big = {"tuned": {f"model-{i}": {"depth": i % 4, "note": "x" * 200} for i in range(300)}}
    write_config(big)
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(len(read_config().get("tuned", {})))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):
        write_config({"tuned": {**big["tuned"], "extra": {"depth": i}}})
    stop.set()
    reader.join()
    assert seen and min(seen) >= 300, min(seen)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left

"""The inotify watch that notices an image reopened (tap-ctl resize)."""

from __future__ import annotations

import threading
from pathlib import Path

from blktap3.tapback.images import ImageWatcher


def test_open_of_a_watched_image_calls_back(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    opened: list[tuple[int, int]] = []
    seen = threading.Event()

    def on_open(key: tuple[int, int]) -> None:
        opened.append(key)
        seen.set()

    watcher = ImageWatcher(on_open)
    try:
        assert watcher.watch(str(image), (5, 51712))
        with open(image, "rb"):
            pass
        assert seen.wait(5)
        assert set(opened) == {(5, 51712)}
        watcher.forget((5, 51712))
        seen.clear()
        with open(image, "rb"):
            pass
        assert not seen.wait(0.2)
    finally:
        watcher.close()


def test_missing_image_is_not_watched(tmp_path: Path) -> None:
    watcher = ImageWatcher(lambda key: None)
    try:
        assert not watcher.watch(str(tmp_path / "absent.img"), (1, 1))
    finally:
        watcher.close()

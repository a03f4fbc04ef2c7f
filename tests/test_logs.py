"""Log reopening (USR1) when the new file cannot be opened: the old stream stays."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from prefork_server.daemon import reopen_log_handlers


def test_a_log_that_cannot_be_reopened_keeps_its_old_stream(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    logger = logging.getLogger("test_logs.keep")
    logger.propagate = False
    handler = logging.FileHandler(directory / "app.log")
    logger.addHandler(handler)
    try:
        old = handler.stream
        moved = tmp_path / "rotated"
        shutil.move(directory, moved)  # the path is gone: nothing can be opened there
        with pytest.raises(FileNotFoundError):
            reopen_log_handlers(logger)
        assert handler.stream is old and not old.closed
        logger.warning("still logged")
        handler.flush()
        assert "still logged" in (moved / "app.log").read_text()
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_reopen_returns_the_paths_and_writes_to_the_new_file(tmp_path: Path) -> None:
    logger = logging.getLogger("test_logs.rotate")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "app.log")
    logger.addHandler(handler)
    try:
        (tmp_path / "app.log").rename(tmp_path / "app.log.1")
        assert reopen_log_handlers(logger) == [str(tmp_path / "app.log")]
        logger.warning("after the rotation")
        handler.flush()
        assert "after the rotation" in (tmp_path / "app.log").read_text()
        assert "after the rotation" not in (tmp_path / "app.log.1").read_text()
    finally:
        logger.removeHandler(handler)
        handler.close()

"""The operator's log: polling by design is progress, not an error; crashes stay errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from leanserve.controller.handlers import ProgressNotError, install_log_filter


@pytest.fixture
def kopf_objects(caplog: pytest.LogCaptureFixture) -> Iterator[logging.Logger]:
    logger = logging.getLogger("kopf.objects")
    saved = list(logger.filters)
    install_log_filter()
    install_log_filter()  # once only, however often the operator starts
    assert sum(isinstance(f, ProgressNotError) for f in logger.filters) == 1
    caplog.set_level(logging.DEBUG, logger="kopf.objects")
    yield logger
    logger.filters[:] = saved


def test_a_poll_of_the_reconcile_handler_is_logged_at_info(
    kopf_objects: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    # kopf's own wording for a TemporaryError, as the real cluster showed every 10 s of profiling.
    kopf_objects.error("Handler 'reconcile_handler' failed temporarily: profiling (running: c6i.large)")
    (record,) = caplog.records
    assert (record.levelno, record.levelname) == (logging.INFO, "INFO")


@pytest.mark.parametrize(
    "message",
    [
        "Handler 'reconcile_handler' failed with an exception. Will retry.",
        "Handler 'other_handler' failed temporarily: something",
    ],
)
def test_crashes_and_other_handlers_keep_their_level(
    kopf_objects: logging.Logger, caplog: pytest.LogCaptureFixture, message: str
) -> None:
    kopf_objects.error(message)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR

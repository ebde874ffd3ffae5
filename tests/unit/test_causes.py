"""Plain words for source failures."""

from __future__ import annotations

import errno

from nbia_sync.causes import network_cause, without_source
from nbia_sync.errors import PermanentError, RetryableError


def _caused(cause: BaseException) -> RetryableError:
    error = RetryableError("getSeries Collection=X: ClientOSError: [Errno 104] blah")
    error.__cause__ = cause
    return error


def test_a_reset_connection_is_named_as_such() -> None:
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert network_cause(_caused(reset)) == "cannot connect (connection reset)"


def test_a_timeout_is_named_as_such() -> None:
    assert network_cause(_caused(TimeoutError())) == "no answer (timed out)"


def test_an_http_answer_is_not_a_network_cause() -> None:
    assert network_cause(PermanentError("getSeries: HTTP 403 forbidden")) is None


def test_the_source_is_not_named_twice() -> None:
    detail = "token password grant for source 'tcia': HTTP 401"
    assert without_source(detail, "tcia") == "token password grant: HTTP 401"
    assert without_source("source 'tcia': refused", "tcia") == "refused"

"""`status` times: whole seconds, and how long ago."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nbia_sync.status import _iso, ago, when

NOW = datetime(2026, 12, 1, 20, 33, 19, tzinfo=UTC)


def test_iso_times_are_whole_seconds() -> None:
    assert _iso(NOW + timedelta(microseconds=123456)) == "2026-12-01T20:33:19+00:00"


def test_when_says_minutes_ago() -> None:
    then = _iso(NOW - timedelta(minutes=3, seconds=5))
    assert when(then, now=NOW) == "2026-12-01 20:30:14 UTC (3 min ago)"


def test_ago_picks_a_readable_unit() -> None:
    assert [ago(s) for s in (5, 600, 5 * 3600, 3 * 86400)] == [
        "5 s ago",
        "10 min ago",
        "5 h ago",
        "3 days ago",
    ]


def test_text_status_summarises_withdrawn_series() -> None:
    import io

    from nbia_sync.status import render_status

    status = {
        "catalog": "sqlite",
        "mirror": "/m",
        "series": {},
        "last_run": None,
        "failures": [],
        "workers": [],
        "unverified": {"series": 0, "files": 0},
        "withdrawn": [
            {
                "series_uid": "1.2.3",
                "source": "tcia",
                "collection": "C",
                "withdrawn_at": _iso(NOW),
                "files_deleted": False,
            }
        ],
    }
    out = io.StringIO()
    render_status(status, out)
    assert "withdrawn by the archive: 1 series (1 with files kept, 0 deleted" in out.getvalue()
    assert "tcia/C 1.2.3 2026-12-01 20:33:19 UTC" in out.getvalue()

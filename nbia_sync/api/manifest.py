"""TCIA portal manifests (``.tcia``): a few ``key=value`` headers, then series UIDs.

Real files vary: header keys in any order or missing, CRLF line ends, blank lines, a
trailing comma on UID lines. Anything else that is not a DICOM UID is refused with the line
number, because a silently skipped line is a silently missing series.

The portal's ``downloadServerUrl`` names its download servlet
(``https://public.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet``, or
the NLST host), never an ``nbia-api/`` root: it says which *server* holds the series, so
a manifest is matched to a configured source by host name (`sources_for_manifest`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nbia_sync.config import SourceSettings
from nbia_sync.errors import ConfigError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX = 64  # DICOM PS3.5: a UI value is at most 64 characters
_LIST_KEY = "listofseriestodownload"


class ManifestError(ConfigError, ValueError):
    """The manifest is not a usable list of series (the message names the line)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    series_uids: list[str]
    download_server_url: str | None = None
    manifest_version: str | None = None
    databasket_id: str | None = None
    # Every header as written (key case kept), including the ones above.
    headers: dict[str, str] = field(default_factory=dict)


# TCIA's host names, by the server they belong to: the portal writes "public", the API
# lives on "services"; NLST has its own server (and tokens).
_SERVERS = {
    "public.cancerimagingarchive.net": "TCIA's main server",
    "services.cancerimagingarchive.net": "TCIA's main server",
    "nlst.cancerimagingarchive.net": "TCIA's NLST server",
}


def _host(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return ""


def server_of(url: str) -> str:
    """The server a URL belongs to: a known TCIA server's name, else its host[:port]."""
    host = _host(url)
    return _SERVERS.get(host, host)


def is_tcia_server(url: str) -> bool:
    return _host(url) in _SERVERS


def sources_for_manifest(
    sources: Sequence[SourceSettings], download_server_url: str
) -> list[SourceSettings]:
    """The sources on the server a manifest's downloadServerUrl names (by host name)."""
    wanted = server_of(download_server_url)
    return [s for s in sources if wanted and server_of(s.url) == wanted]


def is_dicom_uid(text: str) -> bool:
    return len(text) <= _UID_MAX and _UID.match(text) is not None


def parse_manifest(text: str, *, name: str = "manifest") -> Manifest:
    """Parse a ``.tcia`` manifest; UIDs deduplicated in first-seen order.

    ``name`` (e.g. the file path) prefixes error messages.
    """
    headers: dict[str, str] = {}
    uids: dict[str, None] = {}  # an ordered set
    in_list = False
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if not in_list:
            key, sep, value = line.partition("=")
            if sep and not _UID.match(key.strip()):
                key = key.strip()
                if key.lower() == _LIST_KEY:
                    in_list = True
                    line = value.strip()  # some writers start the list on the same line
                    if not line:
                        continue
                else:
                    headers[key] = value.strip()
                    continue
            # A UID before the list marker: the marker is missing, the list has begun.
            in_list = True
        for uid in _uids_on_line(line, number, name):
            uids.setdefault(uid, None)
    if not uids:
        raise ManifestError(f"{name}: lists no series UIDs")
    lowered = {k.lower(): v for k, v in headers.items()}
    return Manifest(
        series_uids=list(uids),
        download_server_url=lowered.get("downloadserverurl") or None,
        manifest_version=lowered.get("manifestversion") or None,
        databasket_id=lowered.get("databasketid") or None,
        headers=headers,
    )


def _uids_on_line(line: str, number: int, name: str) -> list[str]:
    # Trailing commas are common; a comma-separated run of UIDs costs nothing to accept.
    parts = [p.strip() for p in line.split(",")]
    found = []
    for part in parts:
        if not part:
            continue
        if not is_dicom_uid(part):
            shown = part if len(part) <= 80 else part[:77] + "..."
            raise ManifestError(f"{name}, line {number}: not a DICOM series UID: {shown!r}")
        found.append(part)
    return found

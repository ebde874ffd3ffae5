"""md5hashes.csv: the plain lines the archive writes parse as csv would parse them."""

from __future__ import annotations

import csv
import io

from hypothesis import given
from hypothesis import strategies as st

from nbia_sync.transfer.download import _parse_hash_list

# Entry names as a server might write them: no comma, quote or line break (those would
# need quoting, and then only csv can read the row).
_names = st.text(
    st.characters(blacklist_characters=',"\r\n', blacklist_categories=("Cs",)), min_size=1
)
_hashes = st.one_of(st.just(""), st.just(" "), st.from_regex(r"[0-9a-f]{30,32}", fullmatch=True))


@given(st.lists(st.tuples(_names, _hashes), max_size=6), st.booleans())
def test_plain_and_quoted_hash_lists_parse_alike(
    rows: list[tuple[str, str]], trailing_newline: bool
) -> None:
    plain = "\n".join(["Filename,MD5Hash", *(f"{n},{h}" for n, h in rows)])
    plain += "\n" if trailing_newline else ""
    quoted = io.StringIO()
    csv.writer(quoted, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(
        [("Filename", "MD5Hash"), *rows]
    )
    # The quoted copy has quotes, so it goes through csv; the plain one does not.
    assert _outcome(plain.encode()) == _outcome(quoted.getvalue().encode())


def _outcome(data: bytes) -> object:
    try:
        return _parse_hash_list(data, "1.2.3")
    except Exception as exc:  # the same refusal either way
        return type(exc), str(exc)

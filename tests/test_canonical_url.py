"""The canonical URL rule (terms.canonical_url): one form for resource.url and the requestHash."""

from __future__ import annotations

import httpx
import pytest

from escrow_py.protocol.terms import canonical_url, request_hash


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        # Unicode is UTF-8 and percent-encoded, whichever way the client spelled it.
        ("http://h/u/été-✓?q=a%20b", "http://h/u/%C3%A9t%C3%A9-%E2%9C%93?q=a%20b"),
        ("http://h/u/%c3%a9t%C3%A9-%e2%9c%93?q=a%20b", "http://h/u/%C3%A9t%C3%A9-%E2%9C%93?q=a%20b"),
        # No raw spaces; `+` is a plus, not a space.
        ("http://h/u/a b?x=1 2", "http://h/u/a%20b?x=1%202"),
        ("http://h/p?q=a+b", "http://h/p?q=a+b"),
        # Unreserved bytes are decoded, reserved ones stay encoded with upper-case hex.
        ("http://h/%7e%41?a=%2f", "http://h/~A?a=%2F"),
        # Repeated and empty keys are kept, in order; a trailing `?` is dropped.
        ("http://h/p?a=1&a=&b&a=2", "http://h/p?a=1&a=&b&a=2"),
        ("http://h/p?", "http://h/p"),
        # Scheme and host case, default ports, empty path, dot segments, fragments.
        ("HTTP://Example.COM:80", "http://example.com/"),
        ("https://h:443/a/./b/../c", "https://h/a/c"),
        ("http://h:8080/a#frag", "http://h:8080/a"),
        # A stray percent sign is itself encoded, so it cannot be read two ways.
        ("http://h/100%", "http://h/100%25"),
    ],
)
def test_canonical_form(sent: str, canonical: str) -> None:
    assert canonical_url(sent) == canonical
    assert canonical_url(canonical) == canonical  # idempotent


@pytest.mark.parametrize("url", ["/relative", "h/p", "ftp//x", "http://user@h/p", "http:///p"])
def test_not_an_absolute_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        canonical_url(url)


def test_the_clients_url_and_the_servers_raw_target_hash_alike() -> None:
    # httpx encodes the URL before sending; the server sees that raw target: one requestHash.
    sent = httpx.URL("http://h/u/été-✓?q=a%20b&q=&r")
    server_side = b"http://h" + sent.raw_path
    assert request_hash("GET", str(sent)) == request_hash("get", server_side.decode())

"""Who is calling: the client address behind trusted proxies, whether it came over https,
and Safaricom's allow-list.

Owns the one rule for reading `X-Forwarded-For`: it is believed only when the
TCP peer is a configured trusted proxy, and then only the hop that proxy added
(the last one), because every earlier hop is whatever the caller wrote.
"""

import ipaddress


def _address(text):
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # ::ffff:196.201.212.69 is the IPv4 peer seen through a dual-stack socket.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def within(text, networks):
    address = _address(text or "")
    return address is not None and any(address in net for net in networks)


def client_address(environ, trusted_proxies):
    """The caller's address: REMOTE_ADDR, or the last X-Forwarded-For hop from a trusted proxy."""
    peer = environ.get("REMOTE_ADDR") or ""
    if trusted_proxies and within(peer, trusted_proxies):
        last_hop = _address(environ.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1])
        if last_hop is not None:
            return str(last_hop)
    return peer


def over_https(environ, trusted_proxies):
    """Did the request come over https: to this server directly, or to a trusted proxy
    that says so (`X-Forwarded-Proto: https`; the last value, the one it added)?"""
    if environ.get("wsgi.url_scheme") == "https":
        return True
    peer = environ.get("REMOTE_ADDR") or ""
    forwarded = environ.get("HTTP_X_FORWARDED_PROTO", "").rsplit(",", 1)[-1].strip().lower()
    return bool(trusted_proxies) and within(peer, trusted_proxies) and forwarded == "https"

"""Which webhook URLs a job may name. The ops worker POSTs to them, so an address inside the fleet's network
(loopback under any alias, private ranges, link-local metadata endpoints, the Redis port) would make it a
tool for server-side request forgery: the host is resolved and every address it names must be public, unless
it falls in a network the operator allowed. Checked at submit and again at send time (DNS can change), and
the send connects to the address that was checked, within one deadline for the whole delivery (the lookup,
the connection, TLS, the request and the last byte of the answer)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(ValueError):
    """The URL or the address it resolves to is not one the ops worker may send to; the message says why."""


def check_syntax(url: str) -> str:
    """Syntax only (no DNS): an http(s) URL with a host, no credentials, no whitespace or control characters."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise WebhookRefused("must not contain whitespace or control characters (CR, LF, NUL, ...)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WebhookRefused("must not carry credentials (user:password@); sign-in is the signature's job")
    if port == 0:
        raise WebhookRefused("port 0 is not a port")
    return url


_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 sits is the site's choice
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible (::a.b.c.d); :: and ::1 aside


def embedded_ipv4(ip: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries and would reach through a translator or a tunnel: mapped
    (::ffff:a.b.c.d), compatible (::a.b.c.d), 6to4 (2002:AABB:CCDD::), Teredo (2001:0::/32: its server, and its
    client XOR 0xffffffff) and NAT64's well-known prefix (64:ff9b::a.b.c.d). Each with what carried it."""
    if ip.version == 4:
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:
        found.append(("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo server", server), ("Teredo client", client)]
    if ip in _NAT64_WELL_KNOWN:
        found.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    return found


def _plain_why(ip: IPAddress) -> str | None:
    for attr, what in (("is_loopback", "loopback"), ("is_unspecified", "unspecified"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, attr):
            return f"{what} address"
    return None if ip.is_global else "non-public address"


def why_refused(ip: IPAddress) -> str | None:
    """Why a webhook may not go to this address ("loopback address", ...), None if it may. The one rule, used
    at submit (the API) and at send time (the ops worker, on the DNS answers). An IPv6 address that carries an
    IPv4 address (mapped, compatible, 6to4, Teredo, NAT64) is refused when that IPv4 address is, whatever its
    IPv6 range says; an IPv4-mapped address and one in NAT64's well-known prefix are otherwise judged by their
    IPv4 address alone (a connection to them reaches it: an IPv6-only network with DNS64 reaches IPv4
    receivers through 64:ff9b::/96); NAT64's local-use prefix 64:ff9b:1::/48 is always refused (where it puts
    the IPv4 address, and so where it leads, is the site translator's choice)."""
    embedded = embedded_ipv4(ip)
    for via, v4 in embedded:
        why = _plain_why(v4)
        if why:
            return f"{why} ({via} for {v4})"
    if ip.version == 6 and (ip.ipv4_mapped is not None or ip in _NAT64_WELL_KNOWN):
        return None  # the IPv4 address it reaches, checked above, is public
    if ip.version == 6 and ip in _NAT64_LOCAL_USE:
        return "NAT64 local-use address (64:ff9b:1::/48: the site's translator decides where it leads)"
    return _plain_why(ip)


@dataclass(frozen=True)
class Destination:
    url: str
    host: str
    port: int
    address: IPAddress  # the checked address to connect to


def resolve(url: str, allowed: tuple = (), resolver=socket.getaddrinfo) -> Destination:
    """The address to send to; WebhookRefused if the host does not resolve or any address it resolves to is
    refused (one refused address among public ones still refuses: the client picks which to use)."""
    check_syntax(url)
    parts = urlsplit(url)
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise WebhookRefused(f"host {host!r} does not resolve ({exc})") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    if not addresses:
        raise WebhookRefused(f"host {host!r} does not resolve")
    for ip in addresses:
        if any(ip in net for net in allowed):
            continue
        why = why_refused(ip)
        if why:
            raise WebhookRefused(
                f"host {host!r} resolves to {ip}, a {why}; webhooks go only to public addresses "
                "(an operator can allow networks with SDFLEET_WEBHOOK_ALLOW_NETWORKS)")
    return Destination(url=url, host=host, port=port, address=addresses[0])


def receiver(url: str) -> str:
    """Who receives a webhook, for sharing the ops worker fairly: the URL's host and port."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def resolve_within(url: str, allowed: tuple, timeout_s: float, resolver=socket.getaddrinfo) -> Destination:
    """resolve(), given up after timeout_s (TimeoutError): a DNS server that answers slowly must not hold a
    delivery past its deadline. The lookup goes on in a daemon thread of its own until the resolver gives up;
    an address literal needs no lookup and no thread."""
    host = urlsplit(check_syntax(url)).hostname
    try:
        ipaddress.ip_address(host)
        return resolve(url, allowed, resolver)
    except ValueError:
        pass
    outcome: list = []
    done = threading.Event()

    def look_up():
        try:
            outcome.append(resolve(url, allowed, resolver))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=look_up, name="sdfleet-webhook-dns", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"host {host!r} did not resolve within {timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (loading the CA bundle costs ~35 ms of CPU: not per delivery)."""
    global _tls
    if _tls is None:
        _tls = httpx.create_ssl_context()
    return _tls


async def _post(dest: Destination, body: bytes, headers: dict, deadline_s: float) -> int:
    parts = urlsplit(dest.url)
    ip = f"[{dest.address}]" if dest.address.version == 6 else str(dest.address)
    target = urlunsplit((parts.scheme, f"{ip}:{dest.port}", parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": dest.host} if parts.scheme == "https" else {}
    # trust_env=False: no proxy from the environment (it would resolve the name again, unchecked)
    async with httpx.AsyncClient(timeout=deadline_s, follow_redirects=False, trust_env=False,
                                 verify=_tls_context()) as client:
        async with asyncio.timeout(deadline_s):
            response = await client.post(target, content=body, headers={**headers, "Host": parts.netloc},
                                         extensions=extensions)
            return response.status_code


def post(dest: Destination, body: bytes, headers: dict, deadline_s: float) -> int:
    """POST to the checked address (no second DNS lookup; TLS still verifies the host's name), within one
    deadline for the whole exchange: a receiver that trickles a byte every few seconds is cut off, not
    waited for. Returns the status; raises httpx.HTTPError, TimeoutError or OSError."""
    if deadline_s <= 0:
        raise TimeoutError("no time left for the exchange")
    return asyncio.run(_post(dest, body, headers, deadline_s))


def deliver(url: str, allowed: tuple, body: bytes, headers: dict, deadline_s: float,
            resolver=socket.getaddrinfo) -> int:
    """Check the URL's host again (DNS may have changed since submit) and POST to the address checked, the
    lookup and the exchange within one deadline. Returns the status; raises WebhookRefused (never to be
    sent), or httpx.HTTPError, TimeoutError or OSError (this attempt failed)."""
    start = time.monotonic()
    dest = resolve_within(url, allowed, deadline_s, resolver)
    return post(dest, body, headers, deadline_s - (time.monotonic() - start))

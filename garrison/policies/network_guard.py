"""No outbound network, enforced inside every Garrison process.

systemd's IPAddressDeny= fences the service from outside; this guard is the same rule
from inside, so it also holds in a developer install: a Python audit hook refuses any
connect, sendto or name lookup that is not local (Unix sockets, loopback). It fires
before the system call, so a refused attempt sends no packet. Native libraries that
open sockets on their own would bypass it; none of ours do (llama.cpp, ONNX Runtime,
torch CPU), and the Hugging Face libraries are put in offline mode as well.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
_installed = False


class OutboundNetworkRefused(PermissionError):
    pass


def _is_local_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host).strip("[]").split("%", 1)[0].lower()
    if text in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[-1]
        if getattr(sock, "family", None) == socket.AF_UNIX or address is None:
            return
        host = address[0] if isinstance(address, tuple) and address else address
        if not _is_local_host(host):
            raise OutboundNetworkRefused(f"Garrison refuses outbound network access (to {host!r})")
    elif event in _LOOKUPS:
        target = args[0]
        host = target[0] if isinstance(target, tuple) and target else target  # getnameinfo: a sockaddr
        if not _is_local_host(host):
            raise OutboundNetworkRefused(f"Garrison refuses to resolve {host!r}: no network")


# Every name-resolution entry point of the socket module: each may send a DNS query (glibc asks the
# nameservers of /etc/resolv.conf). gethostbyname_ex raises the gethostbyname event.
_LOOKUPS = frozenset({"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"})


def install() -> None:
    """Idempotent; call first thing in the daemon, workers and CLI."""
    global _installed
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True

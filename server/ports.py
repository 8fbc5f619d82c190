"""Refusing to start on a port that another process already listens on.

gRPC binds its listening sockets with SO_REUSEPORT, and Linux lets another socket with
SO_REUSEPORT (of the same user) bind the same address and port: a second `tally serve`
on a busy port would start, and the kernel would spread new connections over both
processes, so calls would land on the wrong server. Before gRPC binds, we bind the same
addresses with plain sockets, without SO_REUSEPORT: that fails with EADDRINUSE if
anything listens there, a gRPC server (with SO_REUSEPORT) or any other program. gRPC
keeps SO_REUSEPORT, so that worker processes of one server can still share a port once
their parent has checked it.

The probes close before gRPC binds, so two servers started in the same instant can
still both pass; the check is for the operator's mistake, not a lock. Port 0 is not
probed: the kernel picks a port nobody holds.
"""

from __future__ import annotations

import errno
import socket

# gRPC reads a wildcard host as "every interface, IPv6 and IPv4" whichever family is
# written, so both families are probed for either spelling.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class PortUnavailable(ValueError):
    """The configured host and port cannot be listened on; the message says why."""


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    """The (family, address) pairs gRPC would bind for host:port."""
    if host in _WILDCARDS:
        return [(socket.AF_INET, ("0.0.0.0", port)), (socket.AF_INET6, ("::", port))]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    pairs: list[tuple[socket.AddressFamily, tuple[str, int]]] = []
    for family, _, _, _, address in found:
        pair = (family, (str(address[0]), port))
        if family in (socket.AF_INET, socket.AF_INET6) and pair not in pairs:
            pairs.append(pair)
    return pairs


def check_port_free(host: str, port: int) -> None:
    """PortUnavailable if something listens on host:port (any of its addresses), else nothing.

    host is written as for gRPC: a name, an IPv4 address, or an IPv6 address in
    brackets ("[::]", "[::1]").
    """
    if port == 0:
        return
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    for family, address in _addresses(bare, port):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # the family is not supported here; gRPC will skip it too
        with probe:
            # SO_REUSEADDR as gRPC sets it: connections of a stopped server lingering in
            # TIME_WAIT do not block a restart, a listening socket still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # The IPv4 side is probed on its own: this one must only see IPv6 holders.
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortUnavailable(
                        f"port {port} is already in use on {host} (another tally serve, or another "
                        "program, listens there); stop it or choose another --port"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise PortUnavailable(
                        f"no permission to listen on port {port} of {host}; choose a port above 1023"
                    ) from None
                # Anything else (e.g. an address this machine does not have) is gRPC's to
                # report or to skip, as it does for a name that resolves to both families.


class PortReservation:
    """Sockets bound (not listening) to a port with SO_REUSEPORT, held while worker processes serve it.

    `tally serve --workers N` checks the port once in the parent, then holds it: the
    workers' listening sockets join it (they set SO_REUSEPORT too), while a foreign
    process's check (a bind without SO_REUSEPORT) still fails, also in the moments when
    a worker is being restarted and no worker listens. A bound socket that does not
    listen receives no connections, so it does not take a share of them.
    """

    def __init__(self, port: int, sockets: list[socket.socket]) -> None:
        self.port = port
        self._sockets = sockets

    def close(self) -> None:
        """Release the port: close the held sockets."""
        for held in self._sockets:
            held.close()
        self._sockets = []


def _bind_shared(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    held = socket.socket(family, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR: with it, Linux lets another SO_REUSEADDR socket (the probe of
        # check_port_free) bind beside one that is not listening, and the hold would not hold.
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        held.bind(address)
    except OSError:
        held.close()
        raise
    return held


def reserve_port(host: str, port: int, *, attempts: int = 20) -> PortReservation:
    """Check host:port as check_port_free does, then hold it for processes that set SO_REUSEPORT.

    Port 0 picks a port free on every address of host (the workers must all get the
    same one, so the kernel cannot pick it for each of them).
    """
    check_port_free(host, port)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    for _ in range(attempts):
        held: list[socket.socket] = []
        chosen = port
        try:
            for family, address in _addresses(bare, chosen):
                try:
                    sock = _bind_shared(family, (address[0], chosen))
                except OSError as exc:
                    if exc.errno == errno.EAFNOSUPPORT or (
                        exc.errno == errno.EADDRNOTAVAIL and held
                    ):  # as in check_port_free: gRPC skips what this machine cannot bind
                        continue
                    raise
                held.append(sock)
                chosen = sock.getsockname()[1]
        except OSError as exc:
            for sock in held:
                sock.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # the port picked on one address is taken on another: pick again
            raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        if not held:
            raise PortUnavailable(f"cannot listen on {host}:{port}: no address to bind")
        return PortReservation(chosen, held)
    raise PortUnavailable(f"found no port free on every address of {host}")

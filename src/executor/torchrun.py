"""``python -m hpi.executor.torchrun <torchrun options>``: torchrun whose rendezvous store listens only on the
address the user gave.

Why: torchrun's static rendezvous (``torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py``) starts the
TCPStore server on node 0 from a port alone, and the store's server binds that port on every interface
(0.0.0.0 / ::): ``--master-addr 127.0.0.1`` still listened to the whole network. ``torch.distributed.TCPStore``
takes ``master_listen_fd``, a socket already bound and listening, and that module imports ``TCPStore`` by name;
so this entry point replaces the name there with ``_store_on_given_address``, which hands the server a socket
bound to ``(master_addr, master_port)``: the one the launcher bound and passed down (its descriptor number in
``HPI_RDZV_LISTEN_FD``; the launcher holds the port from the moment it picks it, so no other process can take it
in between), else one bound here. Everything else is ``torch.distributed.run.main`` as it is. Ranks reach the
store as clients (torchrun's agent store), so this is the only listening socket of the rendezvous. The ranks'
own gloo sockets listen on the interface of ``GLOO_SOCKET_IFNAME``, which the launcher sets to the interface
holding the master address where this machine has it (``interface_of``); NCCL's bootstrap socket
(``NCCL_SOCKET_IFNAME``) is left as NCCL picks it.
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["LISTEN_FD_ENV", "ListenError", "bind_listener", "interface_of", "main"]

LISTEN_FD_ENV = "HPI_RDZV_LISTEN_FD"


class ListenError(ValueError):
    """The rendezvous cannot listen where it was asked to: one line naming the address and the fix."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (port 0: the OS picks one) and listening."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ListenError(f"rendezvous address {host!r} does not resolve ({e.strerror}): pass node 0's address as "
                          f"--master-addr (127.0.0.1 on one node)") from None
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as e:
            sock.close()
            error = error or e
    reason = error.strerror if error is not None else "no address"
    hint = ("another process holds that port: pick another --master-port" if error is not None
            and error.errno == 98 else "pass an address of this machine (node 0) as --master-addr")
    raise ListenError(f"cannot listen on {host}:{port} for the rendezvous ({reason}): {hint}")


def interface_of(host: str) -> str | None:
    """The name of this machine's network interface that holds ``host``'s IPv4 address (``lo`` for 127.0.0.1);
    None where none does (another node's address, IPv6) or where Linux's SIOCGIFADDR cannot tell. Gloo listens on
    the interface ``GLOO_SOCKET_IFNAME`` names, else on whatever the host name resolves to."""
    import fcntl
    import struct

    try:
        address = socket.gethostbyname(host)
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found = socket.inet_ntoa(raw[20:24])
            if found == address or (address.startswith("127.") and found.startswith("127.")):
                return name
    return None


_SERVED: set[tuple[str, int]] = set()  # (host, port) whose store server this process already started


def _store_on_given_address(tcp_store):
    """``tcp_store`` (torch's TCPStore class) as static_tcp_rendezvous calls it, with the master's server handed a
    socket bound to the given address (module docstring)."""

    def make(host_name, port, *args, **kwargs):
        is_master = args[1] if len(args) > 1 else kwargs.get("is_master", False)
        if is_master and kwargs.get("master_listen_fd") is None and (host_name, port) not in _SERVED:
            inherited = os.environ.pop(LISTEN_FD_ENV, None)
            sock = socket.socket(fileno=int(inherited)) if inherited else bind_listener(host_name, port)
            kwargs["master_listen_fd"] = sock.detach()  # the store owns the descriptor from here
            _SERVED.add((host_name, port))  # a second store on it joins this server (multi_tenant)
        return tcp_store(host_name, port, *args, **kwargs)

    return make


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import TCPStore
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous

    static_tcp_rendezvous.TCPStore = _store_on_given_address(TCPStore)
    torchrun.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

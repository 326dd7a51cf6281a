"""Loopback listeners the conformance kit runs on the host, each recording everything that arrives.

Each serves one client at a time in arrival order on its own thread, so a `barrier()` (the kit's
own tagged connection or datagram, sent after a phase) is recorded only after everything that
arrived before it: "nothing arrived during this phase" is then a fact, not a guess about timing.
They bind 127.0.0.1 / ::1 ephemeral ports only."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Callable

from ...core.record import record

IO_TIMEOUT = 5.0
BARRIER_TIMEOUT = 30.0


@record
class Arrival:
    peer: str
    data: bytes


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: list[Arrival] = []

    def add(self, item: Arrival) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self._items)

    def wait_for(self, tag: bytes, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(tag in a.data for a in self._items), timeout)


class _TcpListener:
    """A loopback TCP listener on an ephemeral port whose thread accepts one connection at a time,
    reads what the client sends (`_read`), records it, then lets a subclass answer (`_answer`)."""

    name = "tcp"

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.rec = _Recorder()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _read(self, conn: socket.socket) -> bytes:
        """What the client sent, as far as this listener cares (never raises OSError)."""
        raise NotImplementedError

    def _answer(self, conn: socket.socket) -> None:
        """Reply after recording (nothing by default)."""

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                data = self._read(conn)  # a read error or timeout keeps what arrived
                # Record before answering: a client that saw the answer was recorded.
                self.rec.add(Arrival(str(peer), data))
                try:
                    self._answer(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _recv_until(conn: socket.socket, done: Callable[[bytes], bool], bufsize: int) -> bytes:
    """Bytes received until done(data) or EOF; a timeout keeps what arrived."""
    data = b""
    try:
        while not done(data):
            chunk = conn.recv(bufsize)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


class TrapTcp(_TcpListener):
    """A must-not-connect TCP listener: records every connection and its first bytes."""

    name = "trap-tcp"

    def _read(self, conn: socket.socket) -> bytes:
        return _recv_until(conn, lambda data: len(data) >= 512, 512)

    def barrier(self) -> list[Arrival]:
        """Everything that arrived before now (the barrier connection itself excluded)."""
        tag = f"BARRIER-{uuid.uuid4().hex}".encode()
        with socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT) as s:
            s.sendall(tag)
        if not self.rec.wait_for(tag, BARRIER_TIMEOUT):
            raise RuntimeError(f"trap listener {self.addr} did not record its barrier")
        return [a for a in self.rec.snapshot() if not a.data.startswith(b"BARRIER-")]


class TrapUdp:
    """A must-not-reach UDP listener (the kit's stand-in for an outside resolver). It answers each
    datagram with the same bytes so a positive control sees a reply."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.rec = _Recorder()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"trap-udp-{self.port}", daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.rec.add(Arrival(str(peer), data))
            if not data.startswith(b"BARRIER-"):
                try:
                    self.sock.sendto(data, peer)
                except OSError:
                    pass

    def barrier(self) -> list[Arrival]:
        tag = f"BARRIER-{uuid.uuid4().hex}".encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(tag, (self.host, self.port))
        if not self.rec.wait_for(tag, BARRIER_TIMEOUT):
            raise RuntimeError(f"trap listener udp {self.addr} did not record its barrier")
        return [a for a in self.rec.snapshot() if not a.data.startswith(b"BARRIER-")]

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class Upstream(_TcpListener):
    """The allowed destination: a minimal HTTP/1.1 origin on loopback, one request per connection,
    recording each request line and answering 200 with a body carrying a kit token."""

    name = "upstream"

    def __init__(self, token: str, host: str = "127.0.0.1") -> None:
        self.token = token
        super().__init__(host)

    @property
    def body(self) -> bytes:
        return f"firma-conformance-upstream {self.token}\n".encode()

    def _read(self, conn: socket.socket) -> bytes:
        return _recv_until(conn, lambda head: b"\r\n\r\n" in head or len(head) >= 65536, 4096)

    def _answer(self, conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(self.body)}\r\n\r\n".encode()
            + self.body
        )

    def barrier(self) -> list[Arrival]:
        tag = f"BARRIER-{uuid.uuid4().hex}"
        with socket.create_connection((self.host, self.port), timeout=IO_TIMEOUT) as s:
            s.sendall(f"GET /{tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                s.recv(4096)
            except OSError:
                pass
        if not self.rec.wait_for(tag.encode(), BARRIER_TIMEOUT):
            raise RuntimeError(f"upstream {self.addr} did not record its barrier")
        return [a for a in self.rec.snapshot() if b"BARRIER-" not in a.data]

    def paths(self, arrivals: list[Arrival] | None = None) -> list[str]:
        out = []
        for a in self.barrier() if arrivals is None else arrivals:
            line = a.data.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) >= 2:
                out.append(line[1])
        return out


def reserve_dead_port() -> socket.socket:
    """A TCP port on 127.0.0.1 bound but never listening (connects are refused, nothing else can
    take it while held); the same number is unbound for UDP, so datagrams there are refused too."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s

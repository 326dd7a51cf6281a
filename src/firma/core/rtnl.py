"""The two rtnetlink messages transparent egress needs (DESIGN §5.4), pure: bytes out, an ack in.

`local 0.0.0.0/0 dev lo` and `local ::/0 dev lo` in the local routing table make every address
local inside the sandbox's network namespace, so a listener planted on 0.0.0.0:443 accepts a
connection to any address on port 443 (`getsockname()` is the address dialled), and a port with
no listener is refused at once. A hand-built message rather than pyroute2: importing it costs a
launch 180-250 ms."""

from __future__ import annotations

import struct

RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RT_TABLE_LOCAL = 255
RTPROT_STATIC = 4
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
RTA_OIF = 4
RTA_TABLE = 15
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR_U32 = struct.Struct("=HHI")


def local_default_route(family: int, ifindex: int, seq: int) -> bytes:
    """RTM_NEWROUTE: `local <any>/0 dev <ifindex> table local` for `family` (AF_INET/AF_INET6)."""
    body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_LOCAL, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0)
    body += _RTATTR_U32.pack(8, RTA_OIF, ifindex) + _RTATTR_U32.pack(8, RTA_TABLE, RT_TABLE_LOCAL)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWROUTE, flags, seq, 0) + body


def ack_errno(data: bytes, seq: int) -> int | None:
    """The errno of the kernel's acknowledgement of request `seq` (0: done), None when `data`
    holds no such acknowledgement."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            return None
        if kind == NLMSG_ERROR and got_seq == seq and off + _NLMSGHDR.size + 4 <= len(data):
            return -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
        off += (length + 3) & ~3
    return None

"""`firma ca show [--pem] | rotate`: firma's HTTPS inspection CA (DESIGN §5.7), kept in the state
root. `show` never creates it (the first inspected run does); `rotate` replaces it."""

from __future__ import annotations

import sys

from .. import castore
from ..core import settings
from ..host import detect_host


def add_parser(sub):
    p = sub.add_parser("ca", help="show or rotate firma's HTTPS inspection CA")
    csub = p.add_subparsers(dest="ca_cmd", required=True)
    show = csub.add_parser("show", help="the CA's certificate path, fingerprint, subject and validity")
    show.add_argument("--pem", action="store_true", help="print the CA certificate (PEM) instead")
    csub.add_parser("rotate", help="replace the CA with a new one")
    return p


def _describe(info: castore.CaInfo) -> None:
    print(f"certificate  {info.cert_path}")
    print(f"sha256       {info.fingerprint_sha256}")
    print(f"subject      {info.subject}")
    print(f"valid        {info.not_before} .. {info.not_after}")


def run(args) -> int:
    host = detect_host()
    root = settings.state_root(host.environ, host.uid)
    if args.ca_cmd == "show":
        info = castore.load(root)
        if info is None:
            print(f"no CA yet in {root}; it is created on the first inspected run")
            return 0
        if args.pem:
            sys.stdout.write(info.cert_pem.decode("ascii"))
        else:
            _describe(info)
        return 0
    info = castore.rotate(root)
    print("made a new CA:")
    _describe(info)
    print("sandboxes running now keep the old CA until they end; update every place you installed "
          "the old CA (system or browser trust stores) with this certificate")
    return 0

"""`firma contract validate FILE` and `firma contract schema`.

validate: prints one line per violation on stderr and exits 1, or `<FILE>: valid launch contract
v1` on stdout and exits 0. The file is opened without following a final symlink, so the mode
that is checked is the mode of the file whose bytes are read."""

from __future__ import annotations

import json
import os
import stat
import sys

from ..core.contract_validate import contract_schema, validate_contract_bytes
from ..errors import ContractError

MAX_CONTRACT_BYTES = 4 * 1024 * 1024


def add_parser(sub):
    p = sub.add_parser("contract", help="validate a launch contract or print its JSON Schema")
    csub = p.add_subparsers(dest="contract_command", required=True, metavar="<subcommand>")
    v = csub.add_parser("validate", help="check a launch contract against every runner-side rule")
    v.add_argument("file", metavar="FILE")
    csub.add_parser("schema", help="print the launch contract JSON Schema (draft 2020-12)")
    return p


def read_contract_file(path: str) -> tuple[bytes, int]:
    """(bytes, st_mode) of one open file: no TOCTOU between the mode check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ContractError(f"cannot open launch contract {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"", st.st_mode
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_CONTRACT_BYTES:
                raise ContractError(
                    f"launch contract {path} is larger than {MAX_CONTRACT_BYTES} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks), st.st_mode
    except OSError as exc:
        raise ContractError(f"cannot read launch contract {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def regular_file_exists(path: str) -> bool:
    return os.path.isfile(path)


def run(args) -> int:
    if args.contract_command == "schema":
        print(json.dumps(contract_schema(), indent=2))
        return 0
    raw, mode = read_contract_file(args.file)
    violations = validate_contract_bytes(raw, mode, file_exists=regular_file_exists)
    if violations:
        for v in violations:
            print(f"{args.file}: {v}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid launch contract v1")
    return 0

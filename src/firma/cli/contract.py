"""`firma contract validate FILE` and `firma contract schema`.

validate: prints one line per violation on stderr and exits 1, or `<FILE>: valid launch contract
v1` on stdout and exits 0. The file is opened without following a final symlink, so the mode
that is checked is the mode of the file whose bytes are read."""

from __future__ import annotations

import json
import os
import sys

from ..backends.external import read_contract_file
from ..core.contract_validate import contract_schema, validate_contract_bytes



def add_parser(sub):
    p = sub.add_parser("contract", help="validate a launch contract or print its JSON Schema")
    csub = p.add_subparsers(dest="contract_command", required=True, metavar="<subcommand>")
    v = csub.add_parser("validate", help="check a launch contract against every runner-side rule")
    v.add_argument("file", metavar="FILE")
    csub.add_parser("schema", help="print the launch contract JSON Schema (draft 2020-12)")
    return p


def regular_file_exists(path: str) -> bool:
    return os.path.isfile(path)


def run(args) -> int:
    if args.contract_command == "schema":
        print(json.dumps(contract_schema(), indent=2))
        return 0
    raw, mode = read_contract_file(args.file)
    violations = validate_contract_bytes(raw, mode, file_exists=regular_file_exists, realpath=os.path.realpath)
    if violations:
        for v in violations:
            print(f"{args.file}: {v}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid launch contract v1")
    return 0

"""An external sidecar for the tests (the real firma.services.sidecar.Sidecar). Writes its
endpoint to argv[1], then serves until killed."""

import asyncio
import os
import sys



async def real(out: str, allow: list[str], listen: str) -> None:
    from firma.services.sidecar import Sidecar, SidecarConfig

    d = os.path.dirname(out)
    sc = Sidecar(SidecarConfig(allow_hosts=tuple(allow), policy_path=None,
                               audit_path=os.path.join(d, "ext-audit.jsonl"), key_path=os.path.join(d, "ext-audit.key")))
    endpoint = await sc.start(listen)
    with open(out + ".tmp", "w") as f:
        f.write(endpoint)
    os.rename(out + ".tmp", out)
    await asyncio.Event().wait()


def main() -> None:
    out, rest = sys.argv[1], sys.argv[2:]
    listen = "tcp://127.0.0.1:0"
    if "--listen" in rest:
        i = rest.index("--listen")
        listen = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    asyncio.run(real(out, rest, listen))


if __name__ == "__main__":
    main()

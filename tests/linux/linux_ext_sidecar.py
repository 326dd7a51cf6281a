"""An external sidecar for the tests: the real `firma sidecar` when firma.services exists,
else the minimal stand-in. Writes its endpoint to argv[1], then serves until killed."""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


async def fake(out: str, allow: list[str]) -> None:
    from linux_fakekit import FakeSidecar

    sc = FakeSidecar(allow)
    endpoint = await sc.start()
    with open(out + ".tmp", "w") as f:
        f.write(endpoint)
    os.rename(out + ".tmp", out)
    await asyncio.Event().wait()


def main() -> None:
    out, allow = sys.argv[1], sys.argv[2:]
    try:
        import firma.services.sidecar  # noqa: F401
    except ImportError:
        asyncio.run(fake(out, allow))
        return
    from firma.cli import main as firma_main

    args = ["sidecar", "--listen", "tcp://127.0.0.1:0", "--startup-report", out + ".toml"]
    for a in allow:
        args += ["--allow-host", a]
    sys.exit(firma_main(args))


if __name__ == "__main__":
    main()

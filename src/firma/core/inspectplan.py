"""What HTTPS inspection and credential brokering add to a run's plan (DESIGN §5.7). Pure.

The sandbox trusts firma's CA through a bundle (the host's trusted CAs plus firma's) that the
launcher writes into the run directory: mounted read-only over the system bundle and at
`/run/firma/ca-bundle.pem`, named in the variables common clients read, and for Java as a PKCS12
trust store through JAVA_TOOL_OPTIONS. Each credential's variable holds a per-run placeholder;
the secret itself is read by the launcher and handed only to the services process."""

from __future__ import annotations

import hashlib
import posixpath
from types import MappingProxyType
from typing import Mapping

from ..errors import ConfigError
from .credentials import CredentialSpec, placeholder
from .model import Mount
from .record import field, record

TRUST_DIR = "/run/firma"  # inside the sandbox (a fresh tmpfs)
BUNDLE_FILE = "ca-bundle.pem"  # in the run directory, and inside under TRUST_DIR
TRUSTSTORE_FILE = "ca-truststore.p12"
BUNDLE_INSIDE = posixpath.join(TRUST_DIR, BUNDLE_FILE)
TRUSTSTORE_INSIDE = posixpath.join(TRUST_DIR, TRUSTSTORE_FILE)
# Variables that common clients read for their trusted CAs (each names the whole bundle).
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
          "PIP_CERT", "CARGO_HTTP_CAINFO", "AWS_CA_BUNDLE", "DENO_CERT")
JAVA_ENV = "JAVA_TOOL_OPTIONS"
JAVA_TRUSTSTORE_PASSWORD = "changeit"  # a trust store holds public certificates only


@record
class InspectionPlan:
    inspect: tuple[str, ...] = ()  # [run].inspect + --inspect
    no_inspect: tuple[str, ...] = ()
    credentials: tuple[CredentialSpec, ...] = ()
    placeholders: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # name -> placeholder
    trust: bool = False  # the sandbox trusts firma's CA (mounts and variables below are planned)
    system_bundle: str | None = None  # the host's bundle path, mounted over inside

    def describe(self) -> dict:
        return {
            "inspect": list(self.inspect), "no_inspect": list(self.no_inspect), "ca_trusted_inside": self.trust,
            "credentials": [{"name": c.name, "env": c.env, "hosts": list(c.hosts), "header": c.header,
                             "source": c.source_kind} for c in self.credentials],
        }


def plan_inspection(*, inspect: tuple[str, ...], no_inspect: tuple[str, ...], credentials: tuple[CredentialSpec, ...],
                    policy_path: str | None, embedded: bool, backend: str, run_dir: str, system_bundle: str | None,
                    rand: bytes, passthrough: tuple[str, ...]) -> tuple[InspectionPlan, tuple[Mount, ...], dict[str, str]]:
    """The inspection plan, the mounts it adds and the variables it sets. A Cedar policy may
    decide on requests (known once it is loaded), so with one the CA is trusted inside too."""
    if (inspect or credentials) and not embedded:
        raise ConfigError("[run].inspect, --inspect and [credentials] need firma's embedded sidecar (an external "
                          "sidecar tunnels HTTPS); drop --sidecar / sidecar_endpoint")
    if (inspect or credentials) and backend != "bwrap":
        raise ConfigError(f"[run].inspect, --inspect and [credentials] need the bwrap backend, not {backend}")
    for c in credentials:
        if c.source_kind == "env" and c.source_arg in passthrough:
            raise ConfigError(f"[credentials.{c.name}] reads its secret from ${c.source_arg}, which is also passed to the "
                              f"agent (--env / env_passthrough); remove {c.source_arg} from what the agent gets")
    placeholders = {c.name: placeholder(c.name, hashlib.sha256(rand + b"\0cred\0" + c.name.encode()).hexdigest()[:32])
                    for c in credentials}
    trust = embedded and backend == "bwrap" and bool(inspect or credentials or policy_path)
    plan = InspectionPlan(inspect=inspect, no_inspect=no_inspect, credentials=credentials,
                          placeholders=MappingProxyType(placeholders), trust=trust,
                          system_bundle=system_bundle if trust else None)
    env = {c.env: placeholders[c.name] for c in credentials}
    if not trust:
        return plan, (), env
    bundle = posixpath.join(run_dir, BUNDLE_FILE)
    mounts = [Mount(bundle, BUNDLE_INSIDE, True, generated=True),
              Mount(posixpath.join(run_dir, TRUSTSTORE_FILE), TRUSTSTORE_INSIDE, True, generated=True)]
    if system_bundle:
        mounts.append(Mount(bundle, system_bundle, True, generated=True))  # clients that read only the system store
    env.update({name: BUNDLE_INSIDE for name in CA_ENV})
    env[JAVA_ENV] = (f"-Djavax.net.ssl.trustStore={TRUSTSTORE_INSIDE} -Djavax.net.ssl.trustStoreType=PKCS12 "
                     f"-Djavax.net.ssl.trustStorePassword={JAVA_TRUSTSTORE_PASSWORD}")
    return plan, tuple(mounts), env

"""The launcher's part of HTTPS inspection and credential brokering (DESIGN §5.7), before the
sandbox exists: firma's CA (created on first use), the bundle and Java trust store the sandbox
mounts, the credentials' secrets (read here, handed only to the services process), and the
rules that say which destinations are terminated. The launcher never imports `ssl`."""

from __future__ import annotations

import os
from typing import Any, Mapping

from .. import castore, credsource, privfs
from ..core import inspectplan
from ..core.credentials import Credential
from ..core.inspection import InspectionRules, rules
from ..core.hostcanon import split_authority
from ..core.model import Check
from ..core.record import record
from ..errors import ConfigError

LEAVES_DIR = "leaves"  # in the run directory: leaf keys exist there only while being loaded
MAX_BUNDLE = 16 << 20


@record
class InspectionSetup:
    rules: InspectionRules
    ca_key: str
    ca_cert: str
    private_dir: str
    credentials: tuple[Credential, ...]


def prepare(run: Any, policy: Any, environ: Mapping[str, str]) -> InspectionSetup | None:
    """None when the run has nothing to inspect and no credentials (nothing is made)."""
    plan = run.plan
    ins = plan.inspection
    if ins is None or not (ins.trust or ins.credentials):
        return None
    credentials = tuple(
        Credential(spec=spec, placeholder=ins.placeholders[spec.name], secret=credsource.read_secret(spec, environ))
        for spec in ins.credentials)
    for cred in credentials:
        _refuse_secret_in_env(cred, plan.base_env)
    ca = castore.load_or_create(plan.state_root)
    run_dir = run.dirs.run_dir
    bundle = castore.trust_bundle(_host_bundle(environ, ins.system_bundle), ca.cert_pem)
    # Certificates only (public): readable by the agent's uid inside, as the system bundle is.
    privfs.create_new(os.path.join(run_dir, inspectplan.BUNDLE_FILE), bundle, mode=0o644)
    privfs.create_new(os.path.join(run_dir, inspectplan.TRUSTSTORE_FILE), castore.java_truststore(bundle), mode=0o644)
    leaves = os.path.join(run_dir, LEAVES_DIR)
    privfs.ensure_dir(leaves)
    chosen = rules(ins.inspect, ins.no_inspect,
                   [(c.name, h) for c in ins.credentials for h in c.hosts], policy.request_hosts())
    for spec in ins.credentials:
        for text in spec.hosts:
            _refuse_unreachable_binding(spec.name, text, chosen)
    what = chosen.describe()
    parts = [f"firma CA {ca.fingerprint_sha256[:16]} trusted inside ({inspectplan.BUNDLE_INSIDE})"]
    for key, label in (("inspect", "inspected"), ("credential_hosts", "credential hosts"),
                       ("policy_hosts", "decided per request by the policy"), ("no_inspect", "never inspected")):
        if what[key]:
            parts.append(f"{label}: {', '.join(what[key])}")
    if credentials:
        parts.append("credentials brokered: " + ", ".join(f"{c.spec.name} (${c.spec.env})" for c in credentials))
    run.add_check(Check("inspection", True, "; ".join(parts)))
    return InspectionSetup(rules=chosen, ca_key=ca.key_path, ca_cert=ca.cert_path, private_dir=leaves,
                           credentials=credentials)


def _refuse_unreachable_binding(name: str, text: str, chosen: InspectionRules) -> None:
    """A credential is added only inside an inspected TLS connection to a name: one bound to an IP
    literal, or to a host no_inspect names, would silently never be used."""
    if text.startswith("*."):
        return
    host, _port = split_authority(text, 443)
    if host.is_ip:
        raise ConfigError(f"[credentials.{name}] is bound to the address {text}; bind it to the host name the agent "
                          "uses (inspection needs the TLS server name)")
    if chosen.why(host.host) is None:
        raise ConfigError(f"[credentials.{name}] is bound to {text}, which no_inspect names: its secret could never "
                          "be added; remove the host from no_inspect or from the credential")


def _host_bundle(environ: Mapping[str, str], system_bundle: str | None) -> bytes:
    """The CAs the sandbox keeps trusting: SSL_CERT_FILE in firma's own environment when set (it
    is what the upstream side verifies against), else the system bundle."""
    path = environ.get("SSL_CERT_FILE", "").strip() or system_bundle
    if not path:
        return b""
    data = privfs.read_regular(path, MAX_BUNDLE)
    if data is None:
        raise ConfigError(f"cannot read the CA bundle {path}; fix SSL_CERT_FILE or the system's CA certificates")
    return data


def _refuse_secret_in_env(cred: Credential, env: Mapping[str, str]) -> None:
    secret = cred.secret.decode("latin-1")
    for name, value in env.items():
        if secret in value:
            raise ConfigError(f"[credentials.{cred.spec.name}]: the agent's variable {name} would hold the secret itself; "
                              f"remove it from env_set / --env (the agent gets ${cred.spec.env} as a placeholder)")

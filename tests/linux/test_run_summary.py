"""The run summary (DESIGN §4): after the agent exits, firma names each denied destination with
the exact flag that would allow it, the DNS names refused, and the proof; `--quiet` prints
nothing; `--summary-json` writes the same as JSON. The printed flag is checked by using it."""

from __future__ import annotations

import json

from linux_support import Upstream, base_env, require_tools, run_firma


def test_the_summary_names_the_denied_upstream_and_the_flag_that_allows_it(tmp_path):
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    up = Upstream()
    try:
        probe = (f"curl -s -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{up.port}/x; "
                 f"curl -s -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{up.port}/y; "
                 "getent hosts pkg.example.invalid; true")
        out = tmp_path / "summary.json"
        p = run_firma(["run", "--summary-json", str(out), "--", "sh", "-c", probe], cwd=ws, env=base_env(tmp_path))
        assert p.returncode == 0 and p.stdout.split()[:2] == ["403", "403"], p.stdout + p.stderr
        assert up.hits == []  # nothing reached the upstream
        flag = f"--allow-host 127.0.0.1:{up.port}"
        assert f"127.0.0.1:{up.port}  ×2  (host_not_allowed)  allow with: {flag}" in p.stderr, p.stderr
        assert "pkg.example.invalid" in p.stderr and "proof: " in p.stderr
        doc = json.loads(out.read_text())
        assert doc["denied_total"] == 2 and doc["denied"][0]["allow_flag"] == flag
        assert doc["dns_refused"].get("pkg.example.invalid", 0) >= 1
        # the printed flag, used as printed, lets the same request through (and nothing is denied)
        p = run_firma(["run", *flag.split(), "--", "sh", "-c", probe], cwd=ws, env=base_env(tmp_path))
        assert p.stdout.split()[:2] == ["200", "200"] and len(up.hits) == 2, p.stdout + p.stderr
        assert "allow with" not in p.stderr
        # --quiet: the agent's output only
        p = run_firma(["run", "--quiet", "--", "sh", "-c", probe], cwd=ws, env=base_env(tmp_path))
        assert p.stderr == "", p.stderr
        proofs = sorted((tmp_path / "state" / "proofs").glob("sbx_*.json"), key=lambda q: q.stat().st_mtime)
        assert json.loads(proofs[0].read_text())["denied"] == 2
    finally:
        up.close()


def test_audit_bounds_from_trusted_config_and_exact_counts_in_the_summary(tmp_path):
    """`[audit] events_per_second = 5` (trusted config): 20 denials in a burst are 5 audit lines
    plus aggregate records, and the run summary still counts 20. Control: an untrusted project
    config cannot set it (reported as ignored)."""
    require_tools()
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = tmp_path / "firma.toml"
    cfg.write_text("[audit]\nevents_per_second = 5\n")
    burst = "for i in $(seq 20); do curl -s -o /dev/null http://burst.invalid/$i; done"
    out = tmp_path / "summary.json"
    p = run_firma(["--config", str(cfg), "run", "--quiet", "--summary-json", str(out), "--", "sh", "-c", burst],
                  cwd=ws, env=base_env(tmp_path))
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    burst_events = [e for e in events if "burst.invalid" in e["resource"] or e["resource"] == "*"]
    single = [e for e in burst_events if not e["deny_reason"].startswith("suppressed:")]
    aggregated = sum(int(e["deny_reason"].split(":")[1]) for e in burst_events if e["deny_reason"].startswith("suppressed:"))
    # at most 5 a second are written one by one (a loaded machine may spread the burst over a
    # few seconds); the rest are counted into aggregate records, and nothing is lost
    stamps = [e["timestamp"] for e in burst_events]
    seconds = int((max(stamps) - min(stamps)) / 1e9) + 2
    assert len(single) <= 5 * seconds and (aggregated > 0 or seconds > 4), (len(single), aggregated, seconds)
    assert len(single) + aggregated == 20, (len(single), aggregated)
    assert json.loads(out.read_text())["denied_total"] == 20
    (ws / ".firma").mkdir()
    (ws / ".firma" / "firma.toml").write_text("[audit]\nevents_per_second = 100000\n")
    p = run_firma(["run", "--quiet", "--", "true"], cwd=ws, env=base_env(tmp_path))
    assert "ignored audit.events_per_second" in p.stderr, p.stderr

"""`firma ca show [--pem] | rotate` as a user runs it (a subprocess with FIRMA_STATE_DIR set):
show never creates the CA, rotate replaces it and says what that means, errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from firma import castore

FIRMA = [sys.executable, "-m", "firma"]


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


def firma_ca(state, *args):
    env = {**os.environ, "FIRMA_STATE_DIR": state}
    return subprocess.run(FIRMA + ["ca", *args], capture_output=True, text=True, timeout=120, env=env)


def test_show_without_a_ca_says_when_it_is_made_and_creates_nothing(state):
    r = firma_ca(state, "show")
    assert r.returncode == 0, r.stderr
    assert "no CA yet" in r.stdout and "created on the first inspected run" in r.stdout
    assert not os.path.exists(os.path.join(state, "ca"))
    r = firma_ca(state, "show", "--pem")
    assert r.returncode == 0 and "no CA yet" in r.stdout


def test_show_prints_the_ca(state):
    info = castore.load_or_create(state)
    r = firma_ca(state, "show")
    assert r.returncode == 0, r.stderr
    for value in (info.cert_path, info.fingerprint_sha256, info.subject, info.not_before, info.not_after):
        assert value in r.stdout
    r = firma_ca(state, "show", "--pem")
    assert r.returncode == 0 and r.stdout.encode() == info.cert_pem


def test_rotate_makes_a_new_ca_and_says_what_to_update(state):
    old = castore.load_or_create(state)
    r = firma_ca(state, "rotate")
    assert r.returncode == 0, r.stderr
    new = castore.load(state)
    assert new is not None and new.fingerprint_sha256 != old.fingerprint_sha256
    assert new.fingerprint_sha256 in r.stdout and old.fingerprint_sha256 not in r.stdout
    assert "keep the old CA until they end" in r.stdout
    assert "update every place you installed the old CA" in r.stdout
    assert firma_ca(state, "show").stdout.count(new.fingerprint_sha256) == 1


def test_rotate_without_a_ca_makes_the_first_one(state):
    r = firma_ca(state, "rotate")
    assert r.returncode == 0, r.stderr
    info = castore.load(state)
    assert info is not None and info.fingerprint_sha256 in r.stdout


def test_a_refused_key_is_one_err_line_and_exit_1(state):
    info = castore.load_or_create(state)
    os.chmod(info.key_path, 0o644)
    r = firma_ca(state, "show")
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ERR]  the CA key ") and "firma ca rotate" in lines[0]
    assert firma_ca(state, "rotate").returncode == 0  # the fix it names works
    assert firma_ca(state, "show").returncode == 0

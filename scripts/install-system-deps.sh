#!/usr/bin/env bash
# Installs the Debian packages firma and its test suite need, when any is missing.
# Runs `apt-get update` once, and only when something must be installed.
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v dig >/dev/null 2>&1 || need+=(dnsutils)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v useradd >/dev/null 2>&1 || need+=(passwd)
[ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] \
  || ldconfig -p 2>/dev/null | grep -q 'libseccomp.so.2' || need+=(libseccomp2)
# The seccomp exec gate runs under the system interpreter inside the sandbox (the venv's may live
# under /root, which is hidden there); the unprivileged-user tests use it too.
[ -x /usr/bin/python3 ] || need+=(python3)
[ -x /usr/bin/python3.11 ] || need+=(python3.11)
# The post-run workspace check tests spring the traps they report: git status, cargo check.
command -v git >/dev/null 2>&1 || need+=(git)
command -v cargo >/dev/null 2>&1 || [ -x /root/.cargo/bin/cargo ] || [ -x "$HOME/.cargo/bin/cargo" ] || need+=(cargo)
# Transparent egress tests: clients that ignore proxy variables (Node's fetch, ssh).
[ -x /usr/bin/node ] || need+=(nodejs)
[ -x /usr/bin/ssh ] || need+=(openssh-client)
# HTTPS inspection with real tools: a single-file Java program (`java Hello.java` compiles, so a
# JDK), and git's smart-HTTP CGI (git-http-backend ships with git) behind a local TLS front.
[ -x /usr/bin/java ] && [ -x /usr/bin/javac ] || need+=(default-jdk-headless)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
# Kept caches: pip downloads through a local index twice.
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# Test probes written in C (seccomp, raw sockets).
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[ERR]  missing system packages: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null

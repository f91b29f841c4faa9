#!/usr/bin/env bash
# Sets up a Debian 12 machine for nodemesh: Debian packages, kernel headers for bcc, bpffs,
# and a .venv that can import bcc with the project and its test extras installed.
# Idempotent; when everything is in place it finishes in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (it installs packages, mounts bpffs and links kernel headers)"; exit 1
fi

# iperf3, wrk and nginx: load tools and a fast HTTP server for tests/bench/bench_l4.py, which starts
# its own nginx and iperf3 inside lab pods. Packaged services are not started by the install (a
# temporary policy-rc.d refuses it), so nothing listens on the host because of the set-up.
APT_PACKAGES=(python3-bpfcc linux-headers-amd64 iproute2 bpftool curl tcpdump stunnel4
              python3-venv python3-dev openssl util-linux procps iperf3 wrk nginx)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  policy=/usr/sbin/policy-rc.d ours=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; ours=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$ours" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
fi

# bcc compiles our C against /lib/modules/$(uname -r)/build. The BPF sources use UAPI headers only,
# so any installed linux-headers-* works when the running kernel ships none.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$hdr" ]; then log "no linux-headers-*-amd64 under /usr/src"; exit 1; fi
  common="${hdr%-amd64}-common"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  if [ -d "$common" ]; then ln -sfn "$common" "$kdir/source"; else ln -sfn "$hdr" "$kdir/source"; fi
  log "WARNING: kernel $(uname -r) has no headers package; linked $hdr (and $common) at $kdir/{build,source}"
fi

if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
  log "mounted bpffs at /sys/fs/bpf"
fi

# The venv uses Debian's python3 because bcc (python3-bpfcc) is built for it; only the bcc package
# is linked in, not the whole system site-packages.
VENV=.venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  log "created $VENV with $(/usr/bin/python3 --version)"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp="$VENV/.nodemesh-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing nodemesh with test extras into $VENV"
  pip_log="$VENV/pip-install.log"
  if ! { "$VENV/bin/pip" install --disable-pip-version-check --upgrade pip \
         && "$VENV/bin/pip" install --disable-pip-version-check -e '.[test]'; } >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log" >&2; log "pip install failed (full log: $pip_log)"; exit 1
  fi
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' || { log "bcc does not import in $VENV"; exit 1; }
log "ready"

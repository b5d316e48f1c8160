#!/usr/bin/env bash
# Idempotent setup: Debian packages + .venv built from /usr/bin/python3 (nbdkit embeds
# that interpreter, so the plugin can only import what this venv holds).
# Fast when already done: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd nbdfuse tgt libiscsi-bin
      fio qemu-utils e2fsprogs fuse3 iproute2 iptables python3-venv util-linux openssl
      nftables)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv must come from Debian's interpreter (the one nbdkit's python plugin embeds);
# --system-site-packages gives it python3-libnbd's `nbd` module.
if [ ! -x .venv/bin/python ] || [ "$(readlink -f .venv/bin/python)" != "$(readlink -f /usr/bin/python3)" ]; then
    echo "setup: creating .venv from /usr/bin/python3"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi

stamp=.venv/.nbdgw-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing nbdgw and its pinned dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" > "$stamp"
fi

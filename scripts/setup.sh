#!/usr/bin/env bash
# Idempotent setup: Debian packages + .venv built from /usr/bin/python3 (nbdkit embeds
# that interpreter, so the plugin can only import what this venv holds).
# Fast when already done: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# The packages come from gateway/doctor.py, the one table of what the product and the
# tests need (run with Debian's interpreter: the venv does not exist yet).
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
apt_install() {
    echo "setup: installing Debian packages: $*"
    # Only when something is missing: with nothing to install, setup is offline and fast.
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ -x /usr/bin/python3 ] || apt_install python3
mapfile -t missing < <(/usr/bin/python3 -m gateway.doctor --missing-packages)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
    # Whatever is still missing is an error here, not a test failure later.
    /usr/bin/python3 -m gateway.doctor >/dev/null || { /usr/bin/python3 -m gateway.doctor; exit 1; }
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

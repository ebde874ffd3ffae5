#!/usr/bin/env bash
# Make a local stand-in for the image's base (python:3.11-slim) where no image registry is
# reachable: a Debian bookworm from Debian's own package mirror (debootstrap), shaped like
# the official image (python/pip on PATH, pip allowed to install system-wide), with this
# machine's CA bundle so pip inside the build can reach the package index.
#
#   tests/container/make-base.sh [IMAGE_NAME]     (default python:3.11-slim)
set -euo pipefail
name=${1:-python:3.11-slim}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >/dev/null
ln -sf python3 "$root/usr/bin/python"
ln -sf pip3 "$root/usr/bin/pip"
# The official image's pip installs into the system interpreter; Debian's refuses (PEP 668).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
if [ -r "$ca" ]; then
    cp "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "nbia-sync: local stand-in for $name (debootstrap bookworm)" \
    - "$name" >/dev/null
echo "made $name (stand-in from debootstrap bookworm)"

#!/usr/bin/env bash
# Install sftpfs and what it needs on Debian/Ubuntu, from this checkout.
#   sudo packaging/install-debian.sh            # into /opt/sftpfs, command in /usr/local/bin
#   PREFIX=/somewhere sudo -E packaging/install-debian.sh
# A virtual environment keeps pip away from the system Python (PEP 668).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/sftpfs}

if [ "$(id -u)" != 0 ]; then
  echo "install-debian.sh: run as root (sudo), it installs system packages" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fuse3 brings fusermount3 and mount.fuse3; the rest builds pyfuse3.
apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc openssh-client >/dev/null
# Distribution Pythons need these for venv and for building pyfuse3; a Python
# built from source (pyenv) has them already, and the packages may be absent.
for pkg in python3-dev python3-venv; do
  apt-get install -y -qq "$pkg" >/dev/null 2>&1 || echo "note: $pkg not installed (not needed by every Python)"
done

python3 -m venv "$prefix"
"$prefix/bin/pip" install -q --upgrade pip
"$prefix/bin/pip" install -q "$here"
ln -sf "$prefix/bin/sftpfs" /usr/local/bin/sftpfs
echo "installed: $(/usr/local/bin/sftpfs --version) -> /usr/local/bin/sftpfs"

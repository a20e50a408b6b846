#!/usr/bin/env bash
# Everything Ferry needs on a fresh Debian machine (run as root; idempotent).
# - libclang: the userfaultfd crate generates its kernel bindings with bindgen.
# - iproute2: the tests and `ferry demo` make two hosts from network namespaces.
# - a Python virtualenv with qemu.qmp: the QMP conformance tests use QEMU's own client.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
  need_apt+=(libclang-dev)
fi
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${need_apt[*]} (or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q "${need_apt[@]}" >/dev/null
  }
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import qemu.qmp' >/dev/null 2>&1; then
  echo "setup: creating .venv with qemu.qmp"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check qemu.qmp
fi

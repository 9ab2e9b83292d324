#!/usr/bin/env bash
# Creates .venv with the pinned stack. Installs the Debian packages FFCV needs to build (and the
# embedded Fashion-MNIST) when running as root; otherwise says exactly what to install.
# Idempotent: a stamp holding the hash of pyproject.toml + constraints.txt skips a finished setup.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
APT_PKGS="pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist"

stamp_hash=$(cat pyproject.toml constraints.txt scripts/setup-env.sh | sha256sum | cut -c1-16)
if [[ -f "$VENV/.setup-stamp" && "$(cat "$VENV/.setup-stamp")" == "$stamp_hash" ]]; then
  exit 0
fi

missing=()
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${missing[@]}" >/dev/null \
      || { apt-get -qq update && apt-get -o DPkg::Lock::Timeout=900 install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run 'sudo apt-get install ${missing[*]}' (FFCV needs the first three to build;" >&2
    echo "       dataset-fashion-mnist holds the demo data, or set data.root in the config)." >&2
    pkg-config --exists opencv4 libturbojpeg 2>/dev/null || exit 1
  fi
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel uv
# uv does not read pip's configuration: hand it the same indexes, links and constraints.
uv_args=(--python "$VENV/bin/python" -c constraints.txt --compile-bytecode --index-strategy unsafe-best-match)
for url in $("$VENV/bin/python" -m pip config get global.extra-index-url 2>/dev/null || true); do
  uv_args+=(--extra-index-url "$url")
done
for link in $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
  uv_args+=(--find-links "$link")
done
pip_constraint=$("$VENV/bin/python" -m pip config get global.constraint 2>/dev/null || true)
[[ -n "$pip_constraint" && -f "$pip_constraint" ]] && uv_args+=(-c "$pip_constraint")
# ffcv's setup.py needs numpy and pkg-config at build time; build it against the venv itself.
"$VENV/bin/uv" pip install "${uv_args[@]}" numpy setuptools wheel pillow
"$VENV/bin/uv" pip install "${uv_args[@]}" --no-build-isolation-package ffcv -e ".[dev]"
echo "$stamp_hash" > "$VENV/.setup-stamp"
echo "setup: $VENV ready"

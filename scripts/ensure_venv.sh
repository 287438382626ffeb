#!/usr/bin/env bash
# Makes sure $1 (a python) can create a virtual environment before `make` asks it to: Debian's and
# Ubuntu's python3 cannot without the python3-venv package ("ensurepip is not available"), and
# `make serve` — the first command a new user types — does not run the full `make system-deps`.
# As root it installs python3-venv; otherwise it says what to install and fails.
set -euo pipefail
py="${1:-python3}"
if "$py" -m ensurepip --version >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing python3-venv: $py cannot create a virtual environment without it"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  exit 0
fi
echo "error: $py cannot create a virtual environment (ensurepip is missing); install python3-venv" >&2
echo "       (sudo apt-get install -y python3-venv), or run make with PYTHON=<a python that can>" >&2
exit 1

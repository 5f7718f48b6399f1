#!/usr/bin/env bash
# The system tools some tests need, from Debian packages (called by `make test`
# and `make install`, as slurm/local_cluster.sh installs Slurm):
#
#   pdflatex  texlive-latex-base texlive-latex-recommended (booktabs)  tests/analysis/test_table.py
#   chromium  chromium (headless)                                      tests/analysis/test_ui.py
#
#   scripts/install_tools.sh          install the missing packages (a no-op when all are there)
#   scripts/install_tools.sh --check  list the missing ones; exit 1 if any
#
# It installs only as root on a machine with apt-get; elsewhere it says what is
# missing and exits 0 (those tests then skip, and under CI=true a skip of them
# is a failure: see tests/conftest.py).
set -euo pipefail

PACKAGES=(texlive-latex-base texlive-latex-recommended chromium)

log() { echo "[install_tools] $*"; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [[ ${1:-} == --check ]]; then
    [[ ${#missing[@]} -eq 0 ]] && { log "all present: ${PACKAGES[*]}"; exit 0; }
    log "missing: ${missing[*]}"; exit 1
fi
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "not installing ${missing[*]} (needs root and apt-get); the LaTeX and browser tests will skip."
    log "install them with: sudo apt-get install ${missing[*]}"
    exit 0
fi
log "installing ${missing[*]} (apt-get, once; later runs find them)"
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# another apt-get (e.g. slurm/local_cluster.sh) may hold the dpkg lock: wait for it
apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
log "installed in $((SECONDS - start)) s"

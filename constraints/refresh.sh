#!/usr/bin/env bash
# Refresh constraints/ci.txt on purpose: resolve `pip install -e ".[dev]"` afresh in a new virtual environment (what
# a new user gets today) and pin every version it chose. Commit the diff with the test run that passed on it.
# CI never runs this: it installs from the file, so a failure there can be reproduced with the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d "${TMPDIR:-/tmp}/moe-refresh.XXXXXX")/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$venv/bin/python" -m pip install --quiet torch==2.13.0  # the local CPU wheel (a loose torch pulls a CUDA build)
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
{
  echo "# Exact versions a fresh \`pip install -e \".[dev]\"\` resolved ($(date -u +%Y-%m-%d), $("$venv/bin/python" --version),"
  echo "# $(uname -m)); .ci/run installs from this file. Refresh on purpose: bash constraints/refresh.sh"
  "$venv/bin/python" -m pip freeze --exclude-editable | LC_ALL=C sort -f
} > constraints/ci.txt
echo "constraints/ci.txt: $(grep -vc '^#' constraints/ci.txt) pins; review: git diff constraints/ci.txt"

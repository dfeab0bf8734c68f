#!/usr/bin/env bash
# System packages pgturso's build, demo and tests need (Debian 12). Installs only what is missing.
set -euo pipefail
need=()
# python3-psycopg and python3-requests: for pgturso.sync(), which runs the worker inside the server.
# postgresql-15-cron: pg_cron, which schedules pgturso.sync() (tested).
# postgresql-15-pgq3: PgQ, a baseline the benchmark (and its quick run in the tests) measures against.
for pkg in postgresql-15 postgresql-plpython3-15 postgresql-server-dev-15 python3-venv python3-psycopg \
           postgresql-15-cron \
           python3-requests postgresql-15-pgq3 nodejs npm; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# node/npm may come from elsewhere than Debian's packages: accept any working ones.
if command -v node >/dev/null && command -v npm >/dev/null; then
  need=("${need[@]/nodejs}"); need=("${need[@]/npm}")
fi
pkgs=()
for p in "${need[@]}"; do [ -n "$p" ] && pkgs+=("$p"); done
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${pkgs[*]} (run as root, or: sudo apt-get install ${pkgs[*]})" >&2; exit 1
  fi
  echo "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

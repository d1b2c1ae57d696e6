#!/usr/bin/env bash
# Installs what mintq needs on this machine and makes sure PostgreSQL and Redis answer.
# Sourced by up.sh and test.sh; safe to run again (it only does what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[bootstrap] %s\033[0m\n' "$*" >&2; exit 1; }

command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are missing: apt-get install nodejs npm"

# Python: a venv with the project and its dev tools, reinstalled when pyproject.toml changes.
# Its interpreter is the distribution's Python 3.11+ where there is one (or MINTQ_PYTHON):
# Debian builds it with profile-guided optimisation and links the interpreter statically,
# so it runs mintq's request path faster than an unoptimised build with a shared libpython
# (what pyenv builds by default, and what `python3` may find first on PATH).
# (Debian's venv needs ensurepip, which only the python3-venv package provides.)
python_ok() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -n "${MINTQ_PYTHON:-}" ]; then
  python_ok "$MINTQ_PYTHON" || die "MINTQ_PYTHON=$MINTQ_PYTHON is not a Python 3.11+ with venv"
fi
PYTHON=""
for candidate in ${MINTQ_PYTHON:-} /usr/bin/python3 python3; do
  if python_ok "$candidate"; then PYTHON=$(command -v "$candidate"); break; fi
done
[ -n "$PYTHON" ] || die "Python 3.11 or newer with venv is missing: apt-get install python3 python3-venv"
# A venv made from another interpreter (an older checkout's) is made again.
if [ -x .venv/bin/python ] && ! grep -qx "executable = $(readlink -f "$PYTHON")" .venv/pyvenv.cfg; then
  say "recreating .venv with $PYTHON"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv ($PYTHON)"
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing Python dependencies"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  touch .venv/.installed
fi

# Node: solc-js, OpenZeppelin and anvil, and Swagger UI for /docs, as locked. Not `npm ci`: the
# lock cannot list anvil's binaries for other platforms (the registry mirror here has none), and
# `npm ci` refuses that.
if [ ! -d node_modules/@foundry-rs/anvil ] || [ ! -d node_modules/swagger-ui-dist ] \
  || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing Node packages"
  npm install --no-audit --no-fund --loglevel=error
fi

# PostgreSQL: start the local cluster when it is installed but not answering.
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    say "starting PostgreSQL"
    for version in $(ls /etc/postgresql); do
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  fi
  pg_up || die "PostgreSQL is not answering on 127.0.0.1:5432 and could not be started. Install it (apt-get install postgresql) or set DATABASE_URL to a running server."
fi

# Redis: the Celery broker and the nonce lock.
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }
if ! redis_up; then
  if command -v redis-server >/dev/null; then
    say "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/mintq.log
    for _ in $(seq 1 20); do redis_up && break; sleep 0.5; done
  fi
  redis_up || die "Redis is not answering on 127.0.0.1:6379 and could not be started. Install it (apt-get install redis-server) or set REDIS_URL."
fi

#!/usr/bin/env bash
# Stop the daemons slurm/setup-local-slurm.sh started (by the PIDs it recorded, never by name),
# after cancelling the jobs still queued. State, logs and accounting are kept, so a later setup
# continues with the same job ids; `--purge` also deletes them and the config files it wrote.
set -uo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
STARTED=$ROOT/run/started
OWNER_LINE="# written by slurm/setup-local-slurm.sh; edits are overwritten"
say() { echo "[slurm-local] $*"; }
[ "$(id -u)" = 0 ] || { say "error: run as root" >&2; exit 1; }

alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

if [ -s "$STARTED" ]; then
  if grep -q '^slurmctld ' "$STARTED" && jobs=$(squeue -h -o %A 2>/dev/null) && [ -n "$jobs" ]; then
    say "cancelling $(echo "$jobs" | wc -l) queued job(s)"
    scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile=$(awk -v n="$name" '$1 == n {print $2}' "$STARTED" | tail -1)
    [ -n "$pidfile" ] && alive "$pidfile" "$name" || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    [ -d "/proc/$pid" ] && kill -9 "$pid" 2>/dev/null
    say "stopped $name"
  done
  : >"$STARTED"
fi

if [ "${1:-}" = --purge ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [ -e "$f" ] && grep -qF "$OWNER_LINE" "$f"; then
      rm -f "$f"
      [ -e "$f.before-local-slurm" ] && mv "$f.before-local-slurm" "$f"
    fi
  done
  case "$ROOT" in /|/tmp|/var|/etc|/usr|"") say "not deleting ROOT=$ROOT" ;; *) rm -rf "$ROOT" ;; esac
  say "purged $ROOT and the generated config"
fi

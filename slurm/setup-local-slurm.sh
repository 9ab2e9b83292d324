#!/usr/bin/env bash
# Start a real single-node SLURM 22.05 cluster on this Debian machine, for tests and trying the
# SLURM launcher: munge, slurmctld, slurmd, and (by default) slurmdbd on a private MariaDB so that
# `sacct` works -- submitit reads job states from sacct, and without it a job that dies without a
# result is never seen as finished.
#
# No systemd and no cgroups are needed: every daemon is started by hand and recorded in
# $SLURM_LOCAL_ROOT/run/started, so slurm/teardown-local-slurm.sh stops exactly those, by PID.
# Idempotent: a second run installs nothing, starts only what is down, and restarts the daemons
# it started when the generated config changed. Must run as root. About 11 s from scratch.
#
# Settings (environment):
#   SLURM_LOCAL_ROOT=/tmp/slurm-local   state, spool, logs, pid files, database
#   SLURM_LOCAL_ACCOUNTING=1            0: no slurmdbd/MariaDB (sacct then fails)
#   SLURM_LOCAL_CPUS=$(nproc)           CPUs declared; more than the machine has oversubscribes
#   SLURM_LOCAL_PARTITION=debug   SLURM_LOCAL_CLUSTER=localcluster   SLURM_LOCAL_DB_PORT=3307
#   SLURM_LOCAL_WAIT_S=90               how long to wait for each daemon
# The config goes to /etc/slurm/ so sbatch, squeue and sacct need no SLURM_CONF; a config this
# script did not write is kept as *.before-local-slurm and restored by teardown --purge.
set -euo pipefail

ROOT=${SLURM_LOCAL_ROOT:-/tmp/slurm-local}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-localcluster}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
WAIT_S=${SLURM_LOCAL_WAIT_S:-90}
NODE=localhost
DB_USER=slurm
DB_PASS=local-test-only   # the database listens on 127.0.0.1 and holds only this cluster's job records
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
OWNER_LINE="# written by slurm/setup-local-slurm.sh; edits are overwritten"

say() { echo "[slurm-local] $*"; }
fail() { say "error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts daemons)"

# --- packages ------------------------------------------------------------------------------------
packages=(munge slurm-client slurmctld slurmd)
binaries=(/usr/sbin/munged /usr/bin/sbatch /usr/sbin/slurmctld /usr/sbin/slurmd)
if [ "$ACCOUNTING" = 1 ]; then
  packages+=(slurmdbd mariadb-server)
  binaries+=(/usr/sbin/slurmdbd /usr/sbin/mariadbd)
fi
missing=0
for b in "${binaries[@]}"; do [ -x "$b" ] || missing=1; done
if [ "$missing" = 1 ]; then
  say "installing ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp /tmp/slurm-local-apt.XXXXXX)
  install() { apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${packages[@]}"; }
  if ! install >"$apt_log" 2>&1; then
    apt-get -o DPkg::Lock::Timeout=900 update >>"$apt_log" 2>&1
    install >>"$apt_log" 2>&1 || { tail -20 "$apt_log" >&2; fail "apt-get install failed (log: $apt_log)"; }
  fi
fi

# --- helpers -------------------------------------------------------------------------------------
mkdir -p "$ROOT"/{state,spool,log,run}
STARTED=$ROOT/run/started
touch "$STARTED"
alive() {  # alive PIDFILE NAME: the pid file names a running process called NAME
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
record() { grep -qxF "$1 $2" "$STARTED" || echo "$1 $2" >>"$STARTED"; }
wait_until() {  # wait_until WHAT COMMAND...
  local what=$1 deadline=$(( $(date +%s) + WAIT_S ))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "gave up waiting for $what after ${WAIT_S}s (logs in $ROOT/log)"
    sleep 0.2
  done
}
stop() {  # stop PIDFILE NAME
  alive "$1" "$2" || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}
install_file() {  # install_file PATH MODE CONTENT: returns 0 when the file changed
  local path=$1 mode=$2 content=$3
  [ "$(cat "$path" 2>/dev/null)" = "$content" ] && return 1
  if [ -e "$path" ] && ! grep -qF "$OWNER_LINE" "$path"; then cp "$path" "$path.before-local-slurm"; fi
  printf '%s\n' "$content" >"$path"
  chmod "$mode" "$path"
}

# --- munge ---------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key --force 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  record munged /run/munge/munged.pid
  wait_until munged bash -c 'munge -n | unmunge'
fi

# --- configuration -------------------------------------------------------------------------------
mem_mb=$(/usr/sbin/slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem_mb=${mem_mb:-$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)}
mem_mb=$(( mem_mb * 95 / 100 ))  # declaring more than slurmd detects gets the node drained
if [ "$ACCOUNTING" = 1 ]; then
  accounting=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  accounting=AccountingStorageType=accounting_storage/none
fi
oversubscribe=""
[ "$CPUS" -gt "$(nproc)" ] && oversubscribe=SlurmdParameters=config_overrides
slurm_conf="$OWNER_LINE
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may restart only after cred_expire (default 120 s): keep submitit requeues quick
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# start jobs about 1 s after submission instead of on a 3 s beat
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
$accounting
JobCompType=jobcomp/none
ReturnToService=2
# submitit ignores SIGTERM, so a cancelled job waits KillWait seconds for SIGKILL
KillWait=5
MinJobAge=3600
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
$oversubscribe
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
mkdir -p /etc/slurm
changed=0
install_file "$CONF" 0644 "$slurm_conf" && changed=1
if [ "$ACCOUNTING" = 1 ]; then
  dbd_conf="$OWNER_LINE
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid"
  install_file "$DBD_CONF" 0600 "$dbd_conf" && changed=1  # slurmdbd refuses a world-readable config
fi
if [ "$changed" = 1 ]; then
  say "wrote $CONF"
  for daemon in slurmd slurmctld slurmdbd; do
    grep -q "^$daemon " "$STARTED" && stop "$ROOT/run/$daemon.pid" "$daemon"
  done
fi

# --- accounting: a private MariaDB on 127.0.0.1:$DB_PORT, then slurmdbd -------------------------
if [ "$ACCOUNTING" = 1 ]; then
  db_dir=$ROOT/mysql db_run=$ROOT/mysqld-run
  mkdir -p "$db_run"
  chown mysql:mysql "$db_run"
  if [ ! -d "$db_dir/mysql" ]; then
    mkdir -p "$db_dir"
    chown mysql:mysql "$db_dir"
    mariadb-install-db --no-defaults --user=mysql --datadir="$db_dir" --skip-test-db \
      --auth-root-authentication-method=socket >"$ROOT/log/mariadb-install.log" 2>&1 \
      || fail "mariadb-install-db failed (log: $ROOT/log/mariadb-install.log)"
  fi
  if ! alive "$db_run/mariadbd.pid" mariadbd; then
    say "starting a private mariadbd on 127.0.0.1:$DB_PORT"
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$db_dir" --socket="$db_run/mysqld.sock" \
      --pid-file="$db_run/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --innodb-buffer-pool-size=64M --log-error="$ROOT/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    record mariadbd "$db_run/mariadbd.pid"
    wait_until mariadbd mariadb-admin --no-defaults --socket="$db_run/mysqld.sock" ping
  fi
  mariadb --no-defaults --socket="$db_run/mysqld.sock" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';"
  if ! alive "$ROOT/run/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    /usr/sbin/slurmdbd
    record slurmdbd "$ROOT/run/slurmdbd.pid"
    wait_until slurmdbd sacctmgr -n show cluster
  fi
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# --- controller and compute daemon ---------------------------------------------------------------
if ! alive "$ROOT/run/slurmctld.pid" slurmctld; then
  say "starting slurmctld"
  /usr/sbin/slurmctld -i
  record slurmctld "$ROOT/run/slurmctld.pid"
  wait_until slurmctld scontrol ping
fi
if ! alive "$ROOT/run/slurmd.pid" slurmd; then
  say "starting slurmd"
  /usr/sbin/slurmd -N "$NODE"
  record slurmd "$ROOT/run/slurmd.pid"
fi
node_up() {
  case "$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1)" in
    idle|mixed|allocated|completing) return 0 ;;
    *drain*|down*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}
wait_until "node $NODE" node_up
if [ "$ACCOUNTING" = 1 ]; then  # slurmctld registers with slurmdbd a moment after it starts
  wait_until "slurmctld to register with slurmdbd" \
    bash -c "sacctmgr -n -P show cluster format=cluster,controlport | grep -qx '$CLUSTER|6817'"
  wait_until sacct sacct -n -X -S now-1minutes
fi
say "ready: $(sinfo -h -o 'partition %P, %D node %T, %c CPUs')"

#!/usr/bin/env bash
# A private single-node SLURM cluster on localhost, used to test cluster submission through
# profiles/slurm/ for real (see docs/cluster-testing.md).
#
#   slurm_cluster.sh test      install if needed, start, run tests/cluster (pytest -m cluster), stop
#   slurm_cluster.sh up        install if needed and start; prints how to use it (`source $STATE/env.sh`)
#   slurm_cluster.sh down      stop every daemon this script started (by the PIDs it recorded)
#   slurm_cluster.sh status    show the daemons and the node
#   slurm_cluster.sh install   install the Debian packages only
#
# Everything lives in a private state dir (config, munge key and socket, MariaDB data, spool, logs,
# pid files); nothing under /etc is written and no system service is touched. Ports are private too.
#
# Environment knobs (all optional):
#   SLURM_TEST_STATE       state dir                                   [/tmp/emsedit-slurm-test]
#   SLURM_TEST_ACCOUNTING  1 = MariaDB + slurmdbd (sacct works, the plugin's default status
#                          command is exercised); 0 = none (tests poll with squeue)        [1]
#   SLURM_TEST_PORT_BASE   slurmctld port; slurmd +1, slurmdbd +2, MariaDB +3            [16817]
#   SLURM_TEST_NODE_CPUS / SLURM_TEST_NODE_MEM_MB / SLURM_TEST_NODE_GPUS
#                          size the (declared) node so that production resource requests fit;
#                          jobs are not confined to it (no cgroups)               [32 / 262144 / 4]
#   SLURM_TEST_PROFILE     production profile dir whose partitions/accounts/QOS are created
#                                                                              [profiles/slurm]
#   CLUSTER_WORKFLOW, CLUSTER_SMK_ARGS, CLUSTER_FAIL_ARGS, CLUSTER_FAIL_RULE:
#                          what the test runs, see tests/cluster/test_slurm.py
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${SLURM_TEST_STATE:-/tmp/emsedit-slurm-test}
ACCOUNTING=${SLURM_TEST_ACCOUNTING:-1}
PORT_BASE=${SLURM_TEST_PORT_BASE:-16817}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
NODE_CPUS=${SLURM_TEST_NODE_CPUS:-32}
NODE_MEM=${SLURM_TEST_NODE_MEM_MB:-262144}
NODE_GPUS=${SLURM_TEST_NODE_GPUS:-4}
PROFILE=$(cd "${SLURM_TEST_PROFILE:-$REPO/profiles/slurm}" 2>/dev/null && pwd || echo "${SLURM_TEST_PROFILE:-$REPO/profiles/slurm}")
PY=${PYTHON:-$REPO/.venv/bin/python}
CLUSTER_NAME=emsedittest
READY_TIMEOUT=${SLURM_TEST_READY_TIMEOUT:-60}

ETC=$STATE/etc
PIDS=$STATE/pids
LOGS=$STATE/log
OVERLAY=$STATE/profile
MUNGE_SOCKET=$STATE/munge/munge.socket.2
export SLURM_CONF=$ETC/slurm.conf

# Stop order matters: compute daemon first, database last, munge (auth for all of them) at the end.
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"

say() { printf '[slurm-cluster] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

pkgs() {
  local p="slurm-wlm munge"
  [ "$ACCOUNTING" = 1 ] && p="$p slurmdbd mariadb-server"
  echo "$p"
}

missing_pkgs() {
  local p out=""
  for p in $(pkgs); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out="$out $p"
  done
  echo "$out"
}

cmd_install() {
  local missing t0
  missing=$(missing_pkgs)
  if [ -z "$missing" ]; then
    say "packages present: $(pkgs)"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "cannot install SLURM: packages missing ($missing) and not root"
  command -v apt-get >/dev/null || die "cannot install SLURM: no apt-get (Debian/Ubuntu expected)"
  t0=$(now)
  say "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # The lock timeout matters on a shared machine where someone else may be running apt.
  apt-get -o DPkg::Lock::Timeout=300 update -qq >"/tmp/slurm-apt-update.$$.log" 2>&1 \
    || { tail -20 "/tmp/slurm-apt-update.$$.log" >&2; die "apt-get update failed"; }
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing \
    >"/tmp/slurm-apt-install.$$.log" 2>&1 \
    || { tail -30 "/tmp/slurm-apt-install.$$.log" >&2; die "apt-get install failed"; }
  rm -f "/tmp/slurm-apt-update.$$.log" "/tmp/slurm-apt-install.$$.log"
  say "installed in $(elapsed "$t0") s"
}

# --- processes -------------------------------------------------------------------------------

# A recorded PID counts as ours only while it is alive and still runs the same program
# (guards against PID reuse after a crash or a reboot of the container).
ours() {
  local name=$1 pid
  [ -s "$PIDS/$name.pid" ] || return 1
  pid=$(cat "$PIDS/$name.pid")
  [ -d "/proc/$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  echo "$pid"
}

# start NAME CMD...: run a daemon in the foreground of its own session, record its PID.
start() {
  local name=$1 pid
  shift
  if pid=$(ours "$name"); then
    say "$name already running (pid $pid)"
    return 0
  fi
  setsid "$@" </dev/null >>"$LOGS/$name.out" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDS/$name.pid"
  sleep 0.2
  kill -0 "$pid" 2>/dev/null || { tail -20 "$LOGS/$name.out" "$LOGS/$name.log" 2>/dev/null >&2; die "$name exited at start"; }
  say "started $name (pid $pid)"
}

# wait_for WHAT CHECK LOG: poll CHECK (each try capped at 10 s) until it succeeds or the deadline.
wait_for() {
  local what=$1 check=$2 log=$3 deadline
  deadline=$(($(date +%s) + READY_TIMEOUT))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if timeout 10 bash -c "$check" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  say "timeout after ${READY_TIMEOUT}s waiting for $what ($check); last log lines:"
  tail -25 "$log" >&2 2>/dev/null
  return 1
}

stop_one() {
  local name=$1 pid i
  pid=$(ours "$name") || { rm -f "$PIDS/$name.pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    sleep 0.5
  fi
  if kill -0 "$pid" 2>/dev/null; then
    say "could not stop $name (pid $pid)"
    return 1
  fi
  rm -f "$PIDS/$name.pid"
  say "stopped $name (pid $pid)"
}

cmd_down() {
  local rc=0 name ids
  [ -d "$PIDS" ] || { say "nothing to stop ($STATE has no pid files)"; return 0; }
  # Cancel anything still queued or running so that no slurmstepd/job outlives slurmd.
  if ours slurmctld >/dev/null && [ -f "$SLURM_CONF" ]; then
    ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      say "cancelling jobs still in the queue: $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null
      wait_for "queue to drain" '[ -z "$(squeue -h -o %i)" ]' "$LOGS/slurmctld.log" || true
    fi
  fi
  for name in $DAEMONS; do
    stop_one "$name" || rc=1
  done
  unlink_default_conf
  return $rc
}

# --- configuration ---------------------------------------------------------------------------

# The slurm plugin's job step (snakemake-executor-plugin-slurm-jobstep 0.6) removes every SLURM_*
# variable but a few from the environment of its inner `srun`, SLURM_CONF included, so that srun
# reads the default /etc/slurm/slurm.conf. Point that path at this cluster's config while it runs
# (a symlink, removed by `down`), unless the machine has a slurm.conf of its own.
DEFAULT_CONF=/etc/slurm/slurm.conf
link_default_conf() {
  if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$SLURM_CONF" ]; then return 0; fi
  if [ -e "$DEFAULT_CONF" ] || [ -L "$DEFAULT_CONF" ]; then
    die "$DEFAULT_CONF exists (another SLURM setup?); the job step's srun would read it instead of the test cluster's config"
  fi
  install -d "$(dirname "$DEFAULT_CONF")"
  ln -s "$SLURM_CONF" "$DEFAULT_CONF"
}
unlink_default_conf() {
  if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$SLURM_CONF" ]; then
    rm -f "$DEFAULT_CONF" && say "removed $DEFAULT_CONF (link to the test config)"
  fi
}

port_busy() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }

write_configs() {
  local partitions="" accounts="" qos="" p pline needs noacct=""
  [ -f "$PROFILE/config.yaml" ] || [ -f "$PROFILE/profile.yaml" ] \
    || die "no production profile at $PROFILE (config.yaml missing)"
  # The production profile stays as it is; a generated overlay fills its site placeholders
  # (<gpu-partition>, <account>, ...) with names this cluster creates, plus the static test overrides.
  [ "$ACCOUNTING" = 1 ] || noacct=--no-accounting
  "$PY" "$REPO/tests/cluster/cluster_profile.py" overlay "$PROFILE" "$REPO/tests/cluster/profile" \
    "$OVERLAY" $noacct | sed 's/^/[slurm-cluster] overlay: /' >&2 || die "cannot write the test overlay for $PROFILE"
  if [ "$ACCOUNTING" != 1 ]; then
    # No slurmdbd: the plugin's default status command (sacct) would hang; poll with squeue.
    echo "slurm-status-command: squeue" >>"$OVERLAY/config.yaml"
  fi
  needs=$("$PY" "$REPO/tests/cluster/cluster_profile.py" needs "$PROFILE" "$OVERLAY") || die "cannot read $PROFILE"
  eval "$needs"
  partitions=$PARTITIONS; accounts=$ACCOUNTS; qos=$QOS
  say "cluster gets partitions='${partitions}' accounts='${accounts}' qos='${qos}'"
  echo "$accounts" >"$ETC/accounts"
  echo "$qos" >"$ETC/qos"

  pline="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  for p in $partitions; do
    [ "$p" = debug ] && continue
    pline="$pline
PartitionName=$p Nodes=ALL MaxTime=INFINITE State=UP"
  done

  local acct i gres=""
  if [ "$NODE_GPUS" -gt 0 ]; then
    install -d "$STATE/dev"
    for i in $(seq 0 $((NODE_GPUS - 1))); do
      mknod "$STATE/dev/gpu$i" c 1 3 2>/dev/null || { NODE_GPUS=0; break; }
    done
    [ "$NODE_GPUS" -gt 0 ] || say "WARNING: mknod not permitted: the test node has no GPUs; GPU requests cannot be scheduled"
  fi
  [ "$NODE_GPUS" -gt 0 ] && gres=" Gres=gpu:$NODE_GPUS"
  if [ "$ACCOUNTING" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For the connection to slurmdbd, munge's socket is given here, not by AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStoreFlags=job_comment"
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi

  cat >"$ETC/slurm.conf" <<CONF
# Generated by workflow/scripts/slurm_cluster.sh -- a one-node test cluster on localhost.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# The node is declared larger than the machine so that production-sized requests (cpus, mem, GPUs)
# are accepted; slurmd does not drain it for that. Nothing is confined (no cgroups).
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
# Finished jobs stay visible to squeue/scontrol for 5 min; the slurm plugin needs
# MinJobAge >= 3 x slurm-init-seconds-before-status-checks to use squeue at all.
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=localhost CPUs=$NODE_CPUS RealMemory=$NODE_MEM$gres State=UNKNOWN
$pline
CONF
  # GPUs: slurmd only counts GPUs that are character devices, so make stand-ins (clones of
  # /dev/null). Enough for the scheduler to allocate --gpus/--gres requests; no job sees a GPU.
  : >"$ETC/gres.conf"
  if [ "$NODE_GPUS" -gt 0 ]; then
    echo "AutoDetect=off" >"$ETC/gres.conf"
    echo "NodeName=localhost Name=gpu File=$STATE/dev/gpu[0-$((NODE_GPUS - 1))]" >>"$ETC/gres.conf"
  fi

  if [ "$ACCOUNTING" = 1 ]; then
    cat >"$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmtest
LogFile=$LOGS/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
CONF
    chmod 600 "$ETC/slurmdbd.conf"
  fi

  cat >"$STATE/env.sh" <<ENV
# source this to talk to the test cluster (sinfo, squeue, sbatch, sacct) or to run the cluster
# tests by hand: .venv/bin/python -m pytest -m cluster tests/cluster
export SLURM_CONF=$SLURM_CONF
export EMSEDIT_CLUSTER_STATE=$STATE
export EMSEDIT_CLUSTER_ACCOUNTING=$ACCOUNTING
export EMSEDIT_CLUSTER_PROFILE=$PROFILE
export EMSEDIT_CLUSTER_OVERLAY=$OVERLAY
ENV
}

start_munge() {
  install -d -m 0700 "$STATE/munge"
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$STATE/munge/munge.key"
  start munged munged --foreground --force --socket="$MUNGE_SOCKET" \
    --key-file="$STATE/munge/munge.key" --pid-file="$STATE/run/munged.pid" \
    --log-file="$LOGS/munged.log" --seed-file="$STATE/munge/munged.seed" || return 1
  wait_for munge "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'" "$LOGS/munged.log"
}

start_database() {
  local mdb="mariadb --no-defaults --socket=$STATE/run/mysqld.sock -uroot"
  install -d -m 0755 "$STATE/db"
  mariadb-install-db --no-defaults --datadir="$STATE/db" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$LOGS/mariadb-install.out" 2>&1 \
    || { tail -20 "$LOGS/mariadb-install.out" >&2; return 1; }
  start mariadbd mariadbd --no-defaults --datadir="$STATE/db" --user=root \
    --socket="$STATE/run/mysqld.sock" --pid-file="$STATE/run/mysqld.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --log-error="$LOGS/mariadb.log" --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 --skip-log-bin || return 1
  wait_for MariaDB "$mdb -e 'select 1'" "$LOGS/mariadb.log" || return 1
  $mdb -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmtest';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" || return 1
  start slurmdbd slurmdbd -D || return 1
  wait_for slurmdbd "sacctmgr -n list cluster" "$LOGS/slurmdbd.log"
}

add_associations() {
  local a q
  for a in $(cat "$ETC/accounts"); do
    sacctmgr -i add account "$a" Cluster="$CLUSTER_NAME" >/dev/null || return 1
    sacctmgr -i add user "$(id -un)" Account="$a" Cluster="$CLUSTER_NAME" >/dev/null || return 1
  done
  for q in $(cat "$ETC/qos"); do
    sacctmgr -i add qos "$q" >/dev/null 2>&1   # "normal" exists already
    sacctmgr -i modify user "$(id -un)" set qos+="$q" >/dev/null || return 1
  done
}

cmd_up() {
  local t0 p owner
  t0=$(now)
  [ "$(id -u)" = 0 ] || die "cannot start SLURM here: the daemons need root (uid is $(id -u))"
  cmd_install || return 2
  for p in slurmctld slurmd munged sbatch; do
    command -v "$p" >/dev/null || die "cannot start SLURM: '$p' not found after install"
  done
  [ -x "$PY" ] || die "no Python at $PY (run 'make setup' first)"

  # A cluster in the same state dir: stopped first (by its PIDs) only if whoever started it is gone
  # (an interrupted run); a cluster that is still in use by a live `test` is left alone.
  if [ -d "$PIDS" ] && { ours slurmctld || ours slurmd || ours munged || ours slurmdbd || ours mariadbd; } >/dev/null; then
    owner=$(cat "$STATE/owner" 2>/dev/null)
    if [ -n "$owner" ] && [ "$owner" != "${OWNER_PID:-}" ] && kill -0 "$owner" 2>/dev/null; then
      die "a test cluster in $STATE is in use by process $owner; wait for it or set SLURM_TEST_STATE and SLURM_TEST_PORT_BASE"
    fi
    say "stopping a leftover test cluster in $STATE"
    cmd_down >/dev/null 2>&1 || die "a previous test cluster in $STATE could not be stopped"
  fi
  for p in $CTLD_PORT $SLURMD_PORT $DBD_PORT $DB_PORT; do
    port_busy "$p" && die "cannot start SLURM: port $p is in use (another cluster?); set SLURM_TEST_PORT_BASE"
  done

  # Only a dir this script made (marker file) is wiped; a fresh state makes job ids start at 1.
  if [ -e "$STATE" ] && [ ! -f "$STATE/.slurm-test-state" ]; then
    die "$STATE exists and was not made by this script; refusing to wipe it (set SLURM_TEST_STATE)"
  fi
  rm -rf "$STATE"
  install -d -m 0755 "$STATE" "$ETC" "$PIDS" "$LOGS" "$STATE/run" "$STATE/spool/ctld" "$STATE/spool/d"
  touch "$STATE/.slurm-test-state"
  echo "${OWNER_PID:-$$}" >"$STATE/owner"
  write_configs
  link_default_conf

  start_munge || die "munged did not come up"
  if [ "$ACCOUNTING" = 1 ]; then
    start_database || die "MariaDB/slurmdbd did not come up"
  fi
  start slurmctld slurmctld -D -f "$SLURM_CONF" || die "slurmctld did not start"
  wait_for slurmctld "scontrol ping | grep -q 'is UP'" "$LOGS/slurmctld.log" || die "slurmctld not answering"
  if [ "$ACCOUNTING" = 1 ]; then
    wait_for "cluster registration" "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER_NAME" \
      "$LOGS/slurmdbd.log" || die "slurmctld did not register with slurmdbd"
    add_associations || die "could not create the accounts/QOS named in $PROFILE"
  fi
  start slurmd slurmd -D -N localhost -f "$SLURM_CONF" || die "slurmd did not start"
  wait_for "node idle" "sinfo -h -N -o %T | grep -qx idle" "$LOGS/slurmd.log" || die "node never became idle"
  say "cluster up in $(elapsed "$t0") s (accounting=$ACCOUNTING, state $STATE)"
  sinfo >&2
}

cmd_status() {
  local name pid
  for name in $DAEMONS; do
    if pid=$(ours "$name"); then say "$name: running (pid $pid)"; else say "$name: not running"; fi
  done
  if ours slurmctld >/dev/null; then sinfo >&2; squeue --states=all >&2; fi
}

# --- the test --------------------------------------------------------------------------------

count_jobs() {
  if [ "$ACCOUNTING" = 1 ]; then
    sacct -X -n -P -a -S 2000-01-01 -o JobID 2>/dev/null | grep -c . || true
  else
    grep -c '^JobId=' "$LOGS/jobcomp.log" 2>/dev/null || echo 0
  fi
}

cmd_test() {
  local t0 t_up rc=0 njobs summary
  t0=$(now)
  # The command the documentation gives, dry-run as written (no cluster needed): threads, resources
  # and localrules of every job. A failure here stops before any daemon starts.
  if ! "$PY" -m pytest -p no:cacheprovider -q "$REPO/tests/test_cluster_command.py"; then
    say "FAIL: the documented SLURM command's dry run (tests/test_cluster_command.py)"
    exit 1
  fi
  # Stop every daemon we start, on success, failure or interrupt alike.
  # Only a cluster this process started (owner file) is stopped.
  export OWNER_PID=$$
  trap 'if [ "$(cat "$STATE/owner" 2>/dev/null)" = "$OWNER_PID" ]; then say "teardown"; cmd_down || say "WARNING: teardown incomplete"; fi' EXIT
  trap 'exit 130' INT TERM
  if ! (cmd_up); then
    say "FAIL: the SLURM test cluster could not be started (see above); no job was submitted"
    exit 2
  fi
  t_up=$(elapsed "$t0")
  # shellcheck disable=SC1091
  source "$STATE/env.sh"
  # shellcheck disable=SC2086
  "$PY" -m pytest -p no:cacheprovider -m cluster -v -rA "$REPO/tests/cluster" ${PYTEST_ARGS:-} || rc=$?
  njobs=$(count_jobs)
  if [ -s "$STATE/summary.json" ]; then
    "$PY" - "$STATE/summary.json" >&2 <<'PYEOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
print(f"[slurm-cluster] workflow={s.get('workflow')} profile={s.get('profile')} args={' '.join(s.get('args', []))}")
print(f"[slurm-cluster] planned cluster jobs per rule: {s.get('planned_cluster_jobs')}, local: {s.get('planned_local_jobs')}")
print(f"[slurm-cluster] failure injected in rule {s.get('fail_rule')} by {s.get('fail_by')}")
for label, run in s.get("runs", {}).items():
    jobs = ", ".join(f"{j}:{v['rule']}:{v['state']}" for j, v in run["jobs"].items()) or "none"
    print(f"[slurm-cluster]   {label}: rc={run['rc']} {run['seconds']}s  SLURM jobs: {jobs}")
print(f"[slurm-cluster] Snakemake logs: {s.get('logs')}")
PYEOF
  fi
  if [ "$rc" = 0 ] && [ "${njobs:-0}" -lt 1 ]; then
    say "FAIL: the tests passed but the cluster recorded no job at all"
    rc=3
  fi
  summary="cluster up ${t_up}s, total $(elapsed "$t0")s, SLURM jobs recorded: ${njobs:-0}"
  if [ "$rc" = 0 ]; then say "PASS: $summary"; else say "FAIL (rc=$rc): $summary"; fi
  if [ "$rc" != 0 ]; then
    say "daemon logs are kept in $LOGS until the next run"
  fi
  exit "$rc"
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up && say "use it with: source $STATE/env.sh" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  test) cmd_test ;;
  *) sed -n '2,12p' "$0" >&2; exit 64 ;;
esac

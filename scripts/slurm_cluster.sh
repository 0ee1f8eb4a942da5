#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the SLURM tests, CI and a researcher's
# workstation: scripts/slurm_cluster.sh start | stop | status
#
#   sudo scripts/slurm_cluster.sh start      # installs what is missing, starts, prints:
#   export SLURM_CONF=/tmp/ks-slurm/slurm.conf
#   sudo scripts/slurm_cluster.sh stop       # stops each daemon it started, by its PID
#
# Debian/Ubuntu, as root (apt-get and slurmd need it; jobs then run as the user who submits
# them). Works without systemd: the daemons are started by hand, each in the foreground of
# its own session, and its PID is recorded in $KS_SLURM_DIR/pids/. Everything the cluster
# writes (config, state, spool, logs, a private MariaDB data folder) is in $KS_SLURM_DIR
# (default /tmp/ks-slurm); nothing under /etc is changed, and a database or munged the machine
# already runs is left alone (a working munged is used as it is).
#
# Daemons, in start order: munged (authentication), mariadbd (socket only, --skip-networking,
# its own data folder), slurmdbd (accounting: without it sacct fails, submitit keeps printing
# "Bypassing sacct error" and a sweep master waits forever for a killed job), slurmctld,
# slurmd. Every daemon listens on 127.0.0.1 only (CommunicationParameters=NoCtldInAddrAny,
# NoInAddrAny). `stop` cancels jobs still in the queue, then stops the daemons in reverse
# order, each by its recorded PID, and waits for each to exit.
#
# Environment: KS_SLURM_DIR (state folder), KS_SLURM_PORT (slurmctld's port, default 6817;
# slurmd uses +1 and slurmdbd +2), KS_SLURM_TIMEOUT (seconds to wait for each step, default 60).
set -euo pipefail

DIR=${KS_SLURM_DIR:-/tmp/ks-slurm}
PORT=${KS_SLURM_PORT:-6817}
WAIT=${KS_SLURM_TIMEOUT:-60}
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd) # start order; stop is the reverse

say() { printf 'slurm_cluster: %s\n' "$*"; }
die() {
    printf 'slurm_cluster: error: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# -- recorded PIDs -------------------------------------------------------------------------------

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }

# alive NAME: the recorded PID of NAME is a live process whose command is that daemon (a PID
# reused by another process after a reboot or a crash does not count)
alive() {
    local pid
    pid=$(pid_of "$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$1"
}

# launch NAME CMD...: run CMD in the foreground of a new session (no terminal, survives this
# script), output to log/NAME.out, and record its PID. setsid and setpriv exec the daemon, so
# $! is the daemon itself.
launch() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/pids/$name.pid"
}

# wait_for WHAT LOG CMD...: poll CMD until it succeeds, at most $WAIT s; on timeout show LOG
wait_for() {
    local what=$1 log=$2 deadline=$((SECONDS + WAIT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            printf 'slurm_cluster: error: %s not ready after %ss; last lines of %s:\n' \
                "$what" "$WAIT" "$log" >&2
            tail -n 20 "$log" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

# the daemon's process must still be alive while we wait for it
up_and() {
    local name=$1
    shift
    alive "$name" || return 2
    "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# -- install -------------------------------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "packages already installed"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    local t0
    t0=$(now)
    say "installing ${missing[*]} (apt-get, --no-install-recommends) ..."
    # a stale or empty package list finds nothing: update it first
    DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
        die "apt-get update failed (no access to the package archive?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$DIR/log/apt-get.out" 2>&1 ||
        die "apt-get install ${missing[*]} failed; see $DIR/log/apt-get.out"
    say "installed in $(since "$t0") s"
}

# -- configuration -------------------------------------------------------------------------------

write_config() {
    local cpus mem_mb real_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    # a little under the machine's memory (slurmd drains a node that has less than it claims)
    real_mb=$((mem_mb - mem_mb / 10))
    mkdir -p "$DIR"/{state,spool,log,pids}
    cat >"$CONF" <<EOF
# written by scripts/slurm_cluster.sh: a single-node cluster on 127.0.0.1
ClusterName=ks
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pidfile
SlurmdPidFile=$DIR/spool/slurmd.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that names no memory gets its share per CPU, not the whole node (which would run an
# array's tasks one at a time)
DefMemPerCPU=$((real_mb / cpus))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$CONF"
    # slurmdbd refuses a slurmdbd.conf that others can read
    (
        umask 077
        cat >"$DIR/slurmdbd.conf" <<EOF
# written by scripts/slurm_cluster.sh
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
CommunicationParameters=NoInAddrAny
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageUser=root
StorageLoc=ks_slurm_acct
PidFile=$DIR/state/slurmdbd.pidfile
LogFile=$DIR/log/slurmdbd.log
EOF
    )
    chmod 755 "$DIR" # clients of every user read slurm.conf
}

# -- the daemons ---------------------------------------------------------------------------------

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if alive munged; then return; fi
    if munge_works; then
        say "munged: using the one already running on this machine"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    launch munged setpriv --reuid=munge --regid=munge --clear-groups \
        /usr/sbin/munged --foreground
    wait_for munged "$DIR/log/munged.out" up_and munged munge_works
}

DB_SOCK=$DIR/mysql/mysqld.sock # in the folder the database owns
# accounting for a few thousand jobs: a small buffer pool and redo log (the defaults take
# 128 MB of memory and ~100 MB of disk)
DB_SIZE=(--innodb-buffer-pool-size=32M --innodb-log-file-size=16M)

start_mariadbd() {
    if alive mariadbd; then return; fi
    if [[ ! -d $DIR/mysql/mysql ]]; then
        mkdir -p "$DIR/mysql"
        chown mysql:mysql "$DIR/mysql"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" "${DB_SIZE[@]}" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$DIR/log/mariadb-install-db.out" 2>&1 ||
            die "mariadb-install-db failed; see $DIR/log/mariadb-install-db.out"
    fi
    launch mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" "${DB_SIZE[@]}" \
        --socket="$DB_SOCK" --pid-file="$DIR/mysql/mariadbd.pid" --skip-networking
    wait_for mariadbd "$DIR/log/mariadbd.out" up_and mariadbd \
        mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping
}

start_slurmdbd() {
    if alive slurmdbd; then return; fi
    # the database client library finds the private socket through MYSQL_UNIX_PORT
    MYSQL_UNIX_PORT=$DB_SOCK launch slurmdbd /usr/sbin/slurmdbd -D
    wait_for slurmdbd "$DIR/log/slurmdbd.log" up_and slurmdbd port_open $((PORT + 2))
}

node_idle() { [[ $(sinfo -h -o %t 2>/dev/null) == idle* ]]; }

start_slurmctld() {
    if alive slurmctld; then return; fi
    launch slurmctld /usr/sbin/slurmctld -D -f "$CONF"
    wait_for slurmctld "$DIR/log/slurmctld.log" up_and slurmctld scontrol ping
}

start_slurmd() {
    if alive slurmd; then return; fi
    launch slurmd /usr/sbin/slurmd -D -f "$CONF" -N localhost
    # right after a (re)start the node is "unk" and srun says "Required node not available"
    wait_for "the node (sinfo says idle)" "$DIR/log/slurmd.log" up_and slurmd node_idle
}

# slurmdbd reads its config from beside slurm.conf
export SLURM_CONF=$CONF

start() {
    [[ $(id -u) == 0 ]] || die "start needs root (apt-get, munged, slurmd): sudo $0 start"
    local t0 t1 d running=0
    t0=$(now)
    mkdir -p "$DIR/log" "$DIR/pids"
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then running=$((running + 1)); fi
    done
    install_packages
    t1=$(now)
    if ((running == 0)); then
        for p in $PORT $((PORT + 1)) $((PORT + 2)); do
            ! port_open "$p" || die "port $p on 127.0.0.1 is taken (another SLURM?): set KS_SLURM_PORT"
        done
        write_config
    else
        say "$running of ${#DAEMONS[@]} daemons already running"
        [[ -f $CONF ]] || die "$CONF is missing while daemons run: run '$0 stop' first"
    fi
    local t
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then continue; fi
        t=$(now)
        "start_$d"
        if alive "$d"; then say "$d started (pid $(pid_of "$d"), $(since "$t") s)"; fi
    done
    timeout "$WAIT" srun --quiet -t 1 -N1 -n1 hostname >/dev/null 2>"$DIR/log/srun-check.out" ||
        die "srun hostname failed; see $DIR/log/srun-check.out and $DIR/log/*.log"
    say "cluster up: srun hostname works (install $(since_between "$t0" "$t1") s, start $(since "$t1") s)"
    echo "export SLURM_CONF=$CONF"
}

since_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# stop_daemon NAME: SIGTERM to the recorded PID, wait for the process to exit (SIGKILL after
# $WAIT s), forget the PID
stop_daemon() {
    local name=$1 pid deadline t
    t=$(now)
    pid=$(pid_of "$name")
    if [[ -z $pid ]]; then return; fi
    if ! alive "$name"; then
        say "$name (pid $pid) was not running"
        rm -f "$DIR/pids/$name.pid"
        return
    fi
    kill -TERM "$pid"
    deadline=$((SECONDS + WAIT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "$name (pid $pid) still running after ${WAIT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$DIR/pids/$name.pid"
    say "$name (pid $pid) stopped ($(since "$t") s)"
}

stop() {
    [[ $(id -u) == 0 ]] || die "stop needs root: sudo $0 stop"
    local t0 i jobs
    t0=$(now)
    if [[ ! -d $DIR/pids ]]; then
        say "nothing to stop ($DIR/pids does not exist)"
        return
    fi
    # jobs still queued or running would outlive slurmd (their slurmstepd goes on): cancel them
    if alive slurmctld; then
        jobs=$(squeue -h -t PD,CF,R,S -o %A 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs still in the queue: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + WAIT))
            while [[ -n $(squeue -h -t PD,CF,R,S -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    say "stopped in $(since "$t0") s"
}

status() {
    local d down=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            say "$d: running (pid $(pid_of "$d"))"
        elif [[ $d == munged ]] && munge_works; then
            say "munged: the machine's own (not started by this script)"
        else
            say "$d: not running"
            down=1
        fi
    done
    if ((down == 0)); then
        sinfo 2>&1 | sed 's/^/  /'
        echo "export SLURM_CONF=$CONF"
    fi
    return $down
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status   (state in \$KS_SLURM_DIR, now $DIR)" >&2
    exit 2
    ;;
esac

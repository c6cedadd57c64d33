#!/usr/bin/env bash
# Start / stop a throw-away single-node Slurm cluster for dagrun's tests.
#
#   cluster.sh start DIR   install slurm-wlm + munge if missing, start munged
#                          (if not running), slurmctld and slurmd with state,
#                          logs and pid files in DIR, wait until the node is
#                          idle; last stdout line: export SLURM_CONF=DIR/slurm.conf
#   cluster.sh stop DIR    cancel remaining jobs, stop the daemons started by
#                          `start DIR` (and munged, only if that start began it)
#
# Exit codes: 0 ok; 77 Slurm cannot be run on this machine (not root and not
# installed, apt-get failed, munged will not start): the reason is on stderr;
# 1 any other error (another cluster already running, node not idle in time,
# with the log tail on stderr), 2 usage.
#
# One cluster at a time: the ports are fixed (env DAGRUN_SLURM_CTLD_PORT,
# DAGRUN_SLURM_SLURMD_PORT, default 16817/16818); `start` fails clearly when
# they are already in use. `start DIR` on a DIR whose cluster is already up
# just prints the export line again.
# Needs root (jobs run as the submitting user, root).

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CTLD_PORT="${DAGRUN_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${DAGRUN_SLURM_SLURMD_PORT:-16818}"
CPUS="${DAGRUN_SLURM_CPUS:-2}"
REAL_MEMORY="${DAGRUN_SLURM_REAL_MEMORY:-16000}"
READY_TIMEOUT="${DAGRUN_SLURM_READY_TIMEOUT:-30}"

log() { echo "cluster.sh: $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}

pid_alive() { # pidfile
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_in_use() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tail_logs() {
    local f
    for f in "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/slurmctld.stderr "$DIR"/slurmd.stderr; do
        if [ -s "$f" ]; then
            echo "---- tail $f" >&2
            tail -n 25 "$f" >&2
        fi
    done
}

have_slurm() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 &&
        command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

install_packages() {
    have_slurm && return 0
    [ "$(id -u)" = 0 ] || skip "slurm-wlm/munge are not installed and we are not root to install them"
    command -v apt-get >/dev/null 2>&1 || skip "slurm-wlm/munge are not installed and there is no apt-get"
    mkdir -p "$DIR"
    local aptlog="$DIR/apt.log" made_policy=0 ok=0
    # Keep the packages' maintainer scripts from starting system daemons.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0
               --no-install-recommends install slurm-wlm munge)
    log "installing slurm-wlm and munge with apt-get (log: $aptlog)"
    if "${apt[@]}" >"$aptlog" 2>&1; then
        ok=1
    else
        log "apt-get install failed; running apt-get update and retrying"
        if apt-get -q update >>"$aptlog" 2>&1 && "${apt[@]}" >>"$aptlog" 2>&1; then
            ok=1
        fi
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$ok" != 1 ] || ! have_slurm; then
        tail -n 15 "$aptlog" >&2 || true
        skip "could not install slurm-wlm and munge with apt-get (see $aptlog)"
    fi
}

munge_works() {
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_works; then
        return 0
    fi
    getent passwd munge >/dev/null || skip "no 'munge' user (munge package broken?)"
    install -d -m 0700 -o munge -g munge /etc/munge /var/lib/munge /var/log/munge
    install -d -m 0755 -o munge -g munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # --force: go on if a stale socket from a dead munged is left behind.
    runuser -u munge -- /usr/sbin/munged --force >"$DIR/munged.stderr" 2>&1 ||
        { cat "$DIR/munged.stderr" >&2; skip "munged did not start"; }
    local i
    for i in $(seq 50); do
        munge_works && break
        sleep 0.1
    done
    munge_works || { cat "$DIR/munged.stderr" >&2; skip "munged started but munge/unmunge fail"; }
    # Remember that this cluster started munged, so `stop` stops it.
    cat /run/munge/munged.pid >"$DIR/munged.started" 2>/dev/null || echo unknown >"$DIR/munged.started"
}

write_conf() {
    local host
    host="$(hostname -s)"
    mkdir -p "$DIR/state" "$DIR/spool"
    sed -e "s|@HOST@|$host|g" \
        -e "s|@DIR@|$DIR|g" \
        -e "s|@STATE_DIR@|$DIR/state|g" \
        -e "s|@SPOOL_DIR@|$DIR/spool|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@SLURM_USER@|$(id -un)|g" \
        -e "s|@CPUS@|$CPUS|g" \
        -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
        "$HERE/slurm.conf.in" >"$DIR/slurm.conf"
    if grep -q '@[A-Z_]*@' "$DIR/slurm.conf"; then
        die "unsubstituted placeholder in $DIR/slurm.conf"
    fi
}

node_state() {
    SLURM_CONF="$DIR/slurm.conf" sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

cmd_start() {
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" &&
        case "$(node_state)" in idle | mixed | allocated) true ;; *) false ;; esac; then
        log "cluster in $DIR is already running"
        echo "export SLURM_CONF=$DIR/slurm.conf"
        return 0
    fi
    [ "$(id -u)" = 0 ] || skip "must run as root (slurmd runs jobs as the submitting user)"
    mkdir -p "$DIR"
    install_packages
    local p
    for p in "$CTLD_PORT" "$SLURMD_PORT"; do
        if port_in_use "$p"; then
            local other="" pid
            for pid in $(pgrep -x slurmctld 2>/dev/null || true); do
                other="$other $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
            done
            die "port $p is already in use: another test cluster is running${other:+ (slurmctld:$other)}; only one at a time: stop it with 'cluster.sh stop ITS_DIR'"
        fi
    done
    rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid" "$DIR/munged.started"
    start_munge
    write_conf
    export SLURM_CONF="$DIR/slurm.conf"
    # Both daemonize and write their pid files.
    slurmctld -f "$SLURM_CONF" >"$DIR/slurmctld.stderr" 2>&1 ||
        { tail_logs; die "slurmctld failed to start"; }
    slurmd -f "$SLURM_CONF" >"$DIR/slurmd.stderr" 2>&1 ||
        { tail_logs; die "slurmd failed to start"; }
    local deadline=$((SECONDS + READY_TIMEOUT)) state=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(node_state)"
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        log "node not idle after ${READY_TIMEOUT}s (state: '${state:-none}')"
        tail_logs
        cmd_stop >/dev/null 2>&1 || true
        die "cluster did not become ready"
    fi
    log "cluster ready in $DIR"
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

stop_pidfile() { # pidfile name
    local pid i
    pid_alive "$1" || return 0
    pid="$(cat "$1")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.1
    done
    log "$2 (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

cmd_stop() {
    export SLURM_CONF="$DIR/slurm.conf"
    # Cancel what is still queued or running, so no slurmstepd/job outlives slurmd.
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        local jobs i
        jobs="$(squeue -h -o '%A' 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # SIGKILL the running ones at once (no KillWait), cancel the rest.
            # shellcheck disable=SC2086
            scancel --full --signal=KILL $jobs 2>/dev/null || true
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            # Plain squeue lists only jobs not finished yet (incl. COMPLETING).
            for i in $(seq 60); do
                [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    if [ -s "$DIR/munged.started" ]; then
        local mpid
        mpid="$(cat "$DIR/munged.started")"
        if [ "$mpid" != unknown ] && kill -0 "$mpid" 2>/dev/null; then
            kill -TERM "$mpid" 2>/dev/null || true
            for i in $(seq 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$DIR/munged.started"
    fi
    log "cluster in $DIR stopped"
}

[ $# -eq 2 ] || usage
case "$1" in
    start)
        mkdir -p "$2"
        DIR="$(cd "$2" && pwd)"
        cmd_start
        ;;
    stop)
        [ -d "$2" ] || die "no such directory: $2"
        DIR="$(cd "$2" && pwd)"
        cmd_stop
        ;;
    *) usage ;;
esac

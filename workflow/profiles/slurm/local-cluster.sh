#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try the SLURM profile on a laptop and to test it in CI:
#
#   workflow/profiles/slurm/local-cluster.sh start    # install (if missing), configure, start; waits for the node
#   workflow/profiles/slurm/local-cluster.sh status   # exit 0 when up, 1 when down
#   workflow/profiles/slurm/local-cluster.sh stop     # cancel its jobs, stop the daemons, put the old config back
#
# start installs slurmctld, slurmd, slurm-client and munge from the Debian packages when they are missing
# (`apt-get install --no-install-recommends`, as root), writes /etc/slurm/slurm.conf (an existing one is kept
# aside and put back by stop), starts munged as the munge user (unless one already answers), then
# `slurmctld -D` and `slurmd -D` in the background, and waits until the node is idle. The node is this
# machine with its CPUs and memory, in two partitions, `cpu` (the default) and `gpu`, so that the partition
# names of workflow/profiles/slurm work unchanged; it has no GPUs (the CI profile asks for none).
# State, spool, logs and pid files live under $SURROGATE_SLURM_DIR (default /tmp/surrogate-slurm).
#
# Exit status 3: a cluster cannot be set up here (not root, no apt-get, packages not installable); the reason
# is the last line on stderr. The tests skip with it.
#
# Why /etc/slurm/slurm.conf and not SLURM_CONF: the plugin's job step (snakemake-executor-plugin-slurm-jobstep)
# clears every SLURM_* variable, SLURM_CONF included, before its inner srun, which then reads the default path.
set -euo pipefail

DIR=${SURROGATE_SLURM_DIR:-/tmp/surrogate-slurm}
CONF=/etc/slurm/slurm.conf
BACKUP=/etc/slurm/slurm.conf.before-surrogate
MARK="# Written by surrogate's local-cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
NODE=$(hostname -s)
WAIT_S=${SURROGATE_SLURM_WAIT_S:-60}

say() { echo "local-cluster: $*" >&2; }
unavailable() {
    say "unavailable: $*"
    exit 3
}
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
pid_of() { [[ -s $DIR/run/$1.pid ]] && cat "$DIR/run/$1.pid" || true; }
ours() { [[ -f $CONF ]] && head -n 1 "$CONF" | grep -qF "$MARK"; }
munge_answers() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || unavailable "${missing[*]} not installed and no apt-get (not Debian?)"
    say "installing ${PACKAGES[*]}"
    local apt=(apt-get install -y -q --no-install-recommends "${PACKAGES[@]}")
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$DIR/log/apt.log" 2>&1; then
        # a machine that never ran apt-get update has no package lists
        apt-get update -q >>"$DIR/log/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$DIR/log/apt.log" 2>&1 ||
            unavailable "apt-get could not install ${PACKAGES[*]}: $(tail -n 1 "$DIR/log/apt.log")"
    fi
}

write_config() {
    # this machine as it describes itself (CPUs, sockets, cores), with 90% of its memory so that the node is not
    # drained when the kernel reports a little less later
    local hw mem
    hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
    mem=$(slurmd -C | head -n 1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mkdir -p /etc/slurm
    if [[ -f $CONF ]] && ! ours && [[ ! -f $BACKUP ]]; then
        cp -p "$CONF" "$BACKUP"
    fi
    cat >"$CONF.tmp" <<EOF
$MARK (start); removed or restored by its stop. State under $DIR.
ClusterName=surrogate
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no cgroups, no accounting daemon: what a container or a laptop has
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# jobs share the node by cores and memory; one without a memory request gets DefMemPerCPU per CPU (not the
# whole node, which would run such jobs one at a time)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# finished jobs stay visible to squeue for 15 minutes: the executor plugin polls with squeue (sacct needs
# slurmdbd), and the tests read the states of a whole run's jobs after it
MinJobAge=900
ReturnToService=2
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 $hw RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge_answers; then
        return 0 # a munged of the system's: use it, leave it running
    fi
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key" /etc/munge
        chmod 0400 "$key"
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- munged --pid-file=/run/munge/surrogate-munged.pid
    cp /run/munge/surrogate-munged.pid "$DIR/run/munged.pid"
    for _ in $(seq 50); do
        munge_answers && return 0
        sleep 0.1
    done
    say "munged does not answer (see /var/log/munge/munged.log)"
    exit 1
}

start_daemon() { # name, then the command
    local name=$1
    shift
    # setsid: not in the caller's process group, so a Ctrl-C there leaves the cluster to `stop`; output to files,
    # so that a caller reading this script's output is not held open by the daemons
    setsid "$@" </dev/null >"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/run/$name.pid"
}

cmd_start() {
    if cmd_status >/dev/null 2>&1; then
        say "already running"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || unavailable "needs root (installs packages, writes $CONF, starts daemons)"
    # a start that fails half-way takes down what it started and puts the old configuration back
    trap 'rc=$?; if ((rc != 0)); then cmd_stop >/dev/null 2>&1; fi; exit $rc' EXIT
    mkdir -p "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool"
    export PATH=$PATH:/usr/sbin:/sbin
    install_packages
    write_config
    start_munge
    # -c: a fresh controller state, no jobs or node states from an earlier cluster in $DIR
    start_daemon slurmctld slurmctld -D -c
    start_daemon slurmd slurmd -D
    local state=""
    for _ in $(seq $((WAIT_S * 10))); do
        state=$(node_state)
        [[ $state == idle* ]] && break
        if ! alive "$(pid_of slurmctld)" || ! alive "$(pid_of slurmd)"; then
            say "a daemon exited; its log:"
            tail -n 20 "$DIR"/log/slurm*.log "$DIR"/log/slurm*.out >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    if [[ $state != idle* ]]; then
        say "node $NODE is '${state:-not known}' after ${WAIT_S} s; see $DIR/log"
        exit 1
    fi
    trap - EXIT
    say "up: $(slurmd -V), node $NODE idle, partitions cpu (default) and gpu; logs in $DIR/log"
}

stop_pid() { # pid: TERM, then KILL after 10 s
    local pid=$1
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# the configured cluster's state directory, wherever it is (a stop without the SURROGATE_SLURM_DIR of its start)
configured_dir() {
    if ours; then
        DIR=$(sed -n 's|^StateSaveLocation=\(.*\)/state$|\1|p' "$CONF")
    fi
}

cmd_stop() {
    export PATH=$PATH:/usr/sbin:/sbin
    configured_dir
    local ctld slurmd
    ctld=$(pid_of slurmctld)
    slurmd=$(pid_of slurmd)
    if alive "$ctld"; then
        # jobs outlive slurmd (their slurmstepd keeps running): cancel them first and wait for them to end
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING,PENDING -o %A 2>/dev/null) ]] && break
            sleep 0.1
        done
        scontrol shutdown 2>/dev/null || true
        for _ in $(seq 100); do
            alive "$ctld" || alive "$slurmd" || break
            sleep 0.1
        done
    fi
    stop_pid "$ctld"
    stop_pid "$slurmd"
    # job steps left by a slurmd that was killed: only when the configuration is ours, so they are this cluster's
    if ours; then
        for pid in $(pgrep -x slurmstepd || true); do stop_pid "$pid"; done
    fi
    stop_pid "$(pid_of munged)" # only a munged this script started
    rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" "$DIR/run/munged.pid"
    if ours; then
        if [[ -f $BACKUP ]]; then
            mv "$BACKUP" "$CONF"
        else
            rm -f "$CONF"
        fi
    fi
    say "stopped"
}

cmd_status() {
    configured_dir
    local ctld slurmd munged
    ctld=$(pid_of slurmctld)
    slurmd=$(pid_of slurmd)
    munged=$(pid_of munged)
    if alive "$ctld" && alive "$slurmd" && ours; then
        echo "up: $(slurmd -V); slurmctld $ctld, slurmd $slurmd, munged ${munged:-of the system}"
        sinfo
        return 0
    fi
    echo "down"
    return 1
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac

#!/bin/bash
# A single-node Slurm cluster on this machine (slurmctld + slurmd on localhost, munge auth), for the
# SlurmRunner test (tests/test_helm_slurm.py). Needs root and Debian's slurm-wlm and munge packages:
#   apt-get install -y slurm-wlm munge      # then:
#   bash scripts/slurm_local.sh             # idempotent: (re)writes the config and (re)starts the daemons
set -euo pipefail
command -v slurmctld >/dev/null || { echo "error: slurmctld not found: apt-get install -y slurm-wlm munge" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: run as root (the daemons and their spool folders)" >&2; exit 1; }
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

# munge: a key, and its daemon (it refuses root; Debian makes a munge user)
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
pkill -x munged 2>/dev/null || true
runuser -u munge -- munged

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=flexgen-local
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
slurmctld
slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    echo "slurm up: $(sinfo -h -o '%P %D %T %c')"
    exit 0
  fi
  sleep 1
done
echo "error: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1

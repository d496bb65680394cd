# Shared by cluster/local/up and cluster/local/down (sourced, not run): where the local test cluster keeps
# its state, the ports it uses (the conventions of the `local` entry in qarm_dist/config.py), and the
# helpers that stop only the processes these scripts started.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${QARM_PYTHON:-$REPO/.venv/bin/python}

SPARK_MASTER_PORT=7077
SPARK_MASTER_UI_PORT=8080
SPARK_WORKER_UI_PORT=8081
SPARK_WORKER_CORES=${SPARK_WORKER_CORES:-2}
SPARK_WORKER_MEMORY=${SPARK_WORKER_MEMORY:-2g}
RAY_GCS_PORT=6379
RAY_DASHBOARD_PORT=8265
RAY_CPUS_PER_NODE=${RAY_CPUS_PER_NODE:-1}

SPARK_STATE=$REPO/.spark
RAY_STATE=$REPO/.ray
MASTER_CLASS=org.apache.spark.deploy.master.Master
WORKER_CLASS=org.apache.spark.deploy.worker.Worker

# Loopback-only, offline, no Ray token auth (ENVIRONMENT.md §0, §4); the daemons pass these on to executors,
# Ray workers and job drivers. The venv's bin comes first so a Ray job's `python` is the venv's.
export SPARK_LOCAL_IP=127.0.0.1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_DISABLE_USAGE_STATS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AWS_EC2_METADATA_DISABLED=true TOKENIZERS_PARALLELISM=false
export PYSPARK_PYTHON=$PY PYSPARK_DRIVER_PYTHON=$PY
export PATH=$(dirname "$PY"):$PATH
# A caller's Ray addresses (its own local Ray: qarm_dist.engines.ray_init sets RAY_API_SERVER_ADDRESS) must
# not leak into this cluster's processes, or its job drivers would ask that other Ray about their state.
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
export SPARK_LOG_DIR=$SPARK_STATE/logs SPARK_PID_DIR=$SPARK_STATE/pids SPARK_WORKER_DIR=$SPARK_STATE/work
export SPARK_IDENT_STRING=qarm

# name -> its pgid file, and text that a member's command line must contain: a stale file (reboot, reused
# pid) must never make `down` signal someone else's processes. Each daemon starts in a session of its own,
# so its session id is its pgid, which is what `ps -g` selects by.
declare -A GROUP_FILE=([ray]=$RAY_STATE/ray.pgid [spark-worker]=$SPARK_STATE/worker.pgid [spark-master]=$SPARK_STATE/master.pgid)
declare -A GROUP_MARK=([ray]=ray_nodes.py [spark-worker]=$WORKER_CLASS [spark-master]=$MASTER_CLASS)

# Whether a process group has a live (non-zombie) member. ps's output is captured first: under pipefail,
# `ps | grep -q` fails whenever grep exits before ps has written everything.
group_live() {
  local states
  states=$(ps -o stat= -g "$1" 2>/dev/null) || return 1
  grep -qv '^Z' <<<"$states"
}

# The pgid recorded for NAME if that group still holds our process (its mark in a command line); else nothing.
# (A Spark group's leader, spark-daemon.sh, has exited: its java process is the member that counts.)
group_of() {
  local file=${GROUP_FILE[$1]} pgid members
  [[ -s $file ]] || return 0
  pgid=$(<"$file")
  members=$(ps -ww -o args= -g "$pgid" 2>/dev/null) || return 0
  if [[ $members == *"${GROUP_MARK[$1]}"* ]]; then echo "$pgid"; fi
}

# Stop NAME: SIGTERM (to its leader, or the whole group), up to GRACE s, then SIGKILL to the group.
stop_group() {
  local name=$1 target=$2 grace=${3:-15} pgid
  pgid=$(group_of "$name")
  if [[ -n $pgid ]]; then
    if [[ $target == leader ]]; then kill -TERM "$pgid" 2>/dev/null || true; else kill -TERM -- "-$pgid" 2>/dev/null || true; fi
    for _ in $(seq $((grace * 2))); do group_live "$pgid" || break; sleep 0.5; done
    if group_live "$pgid"; then
      echo "$name: still running after ${grace}s, SIGKILL"
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    echo "$name: stopped (process group $pgid)"
  fi
  rm -f "${GROUP_FILE[$name]}"
}

# Retry the command "${@:2}" until it succeeds; give up once $1 seconds have passed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

port_taken() { [[ -n $(ss -Hltn "sport = :$1") ]]; }

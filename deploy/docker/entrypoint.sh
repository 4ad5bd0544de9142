#!/bin/bash
# The one entry point of every image: the first argument picks what this container runs.
#
#   vision_svc ARGS... | llm_svc ARGS... | gateway ARGS...   one stage (python -m STAGE ARGS...)
#   ray-worker                                               a Ray worker of a multi-node llm_svc group
#   anything else                                            run as given (a shell, a debugging tool)
#
# With RAY_CLUSTER_SIZE set (the leader of a multi-node group), the stage starts only after a Ray head is up
# and RAY_CLUSTER_SIZE nodes have joined it, because vLLM places its workers when the engine starts.
# `exec` hands PID 1 to the stage, so Kubernetes' SIGTERM reaches it and starts its drain.

# Ascend images keep the CANN toolkit's environment in scripts rather than in the image's ENV.
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env_script" ]; then source "$env_script"; fi
done
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"

wait_for_ray_nodes() {
    local wanted="$1" timeout_s="${RAY_JOIN_TIMEOUT_S:-600}" alive=0
    for ((waited = 0; waited < timeout_s; waited += 5)); do
        # A head that is still starting makes the probe fail: count that as no node yet.
        alive=$(python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null || echo 0)
        if [ "$alive" -ge "$wanted" ]; then
            echo "ray: $alive of $wanted nodes up"
            return 0
        fi
        sleep 5
    done
    echo "ray: only $alive of $wanted nodes joined within ${timeout_s} s" >&2
    return 1
}

wait_for_port() {
    local host="$1" port="$2" timeout_s="${RAY_JOIN_TIMEOUT_S:-600}"
    for ((waited = 0; waited < timeout_s; waited += 5)); do
        if python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)' \
            "$host" "$port" 2>/dev/null; then
            return 0
        fi
        sleep 5
    done
    echo "ray: no head at $host:$port after ${timeout_s} s" >&2
    return 1
}

case "${1:-}" in
    vision_svc | llm_svc | gateway)
        if [ -n "${RAY_CLUSTER_SIZE:-}" ]; then
            ray start --head --port="$RAY_PORT" --disable-usage-stats
            wait_for_ray_nodes "$RAY_CLUSTER_SIZE"
        fi
        stage="$1"
        shift
        exec python3 -m "$stage" "$@"
        ;;
    ray-worker)
        # LWS_LEADER_ADDRESS is set by LeaderWorkerSet in every pod of a group. Waiting for the head here,
        # rather than failing, matters: a worker that exits makes LeaderWorkerSet recreate the whole group.
        head="${LWS_LEADER_ADDRESS:?ray-worker needs LWS_LEADER_ADDRESS}"
        wait_for_port "$head" "$RAY_PORT"
        # --block keeps PID 1 alive for as long as the node is part of the cluster.
        exec ray start --address="$head:$RAY_PORT" --block --disable-usage-stats
        ;;
    "")
        echo "usage: vision_svc|llm_svc|gateway ARGS... | ray-worker | COMMAND..." >&2
        exit 2
        ;;
    *)
        exec "$@"
        ;;
esac

# Shared by the load scripts (bench/proxy/*.sh, bench/traffic/run.sh): process cleanup,
# port waits and the wrk + CPU-per-request measurement. The measuring function reads CONNS, WARMUP
# and DURATION; sourcing installs an EXIT trap that kills every pid in PIDS.

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 did not open" >&2; exit 1
}

# Sum of utime+stime ticks of a process and its children (nginx workers).
ticks() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
        if [ -r "/proc/$p/stat" ]; then
            total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
        fi
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

# CPU microseconds per request from two tick readings: cpu_per_req T0 T1 REQUESTS
cpu_per_req() {
    awk -v a="$1" -v b="$2" -v r="$3" -v hz="$HZ" \
        'BEGIN { if (r > 0) printf "%.1f", (b - a) * 1e6 / hz / r; else print "-" }'
}

# wrk_measure PORT PID [PATH]: a warm-up, then a measured run (wrk -t1 on core 0, --latency).
# Sets WRK_OUT (wrk's report), WRK_RPS and WRK_CPU (server CPU us per request).
wrk_measure() {
    local port=$1 pid=$2 path=${3:-/} t0 t1 reqs
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${WARMUP}s" "http://127.0.0.1:$port$path" >/dev/null
    t0=$(ticks "$pid")
    WRK_OUT=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port$path")
    t1=$(ticks "$pid")
    reqs=$(echo "$WRK_OUT" | awk '/requests in/ {print $1}')
    WRK_RPS=$(echo "$WRK_OUT" | awk '/Requests\/sec/ {print $2}')
    WRK_CPU=$(cpu_per_req "$t0" "$t1" "$reqs")
}

#!/usr/bin/env bash
# Opt-in container proof of the CPU image, without a Docker engine (not part of `make test`):
#
#   1. a Debian base made with debootstrap (python3 + venv + CA certificates), cached under
#      $SEQSERVE_PODMAN_CACHE (default /var/tmp/seqserve-podman), imported with `podman import`;
#   2. `podman build --isolation chroot --format docker` of the Dockerfile's `server` target from
#      that base (--build-arg BASE_IMAGE=...), with the model baked in (--build-arg MODEL_DIR=...);
#   3. `podman --runtime runc run --ulimit nofile=1024:1024`, gRPC and metrics published on 127.0.0.1;
#   4. health SERVING (the probe from the host, then the image's own HEALTHCHECK), /metrics answers,
#      one real Generate through the published port equal to offline `seqserve translate`;
#   5. a call in flight, then SIGTERM (`podman stop`): the call completes, the server logs a clean
#      drain, the container exits 0;
#   6. the same image built without a model, with the model mounted at /model instead: SERVING and
#      one Generate (then a clean stop again).
#
#   deploy/podman-smoke.sh [MODEL_DIR]        (default runs/dates-model, from `make demo`)
#   make podman-smoke MODEL=runs/dates-model
#
# Needs root, podman, buildah's chroot isolation, runc and debootstrap (Debian: apt-get install
# podman buildah runc debootstrap), the project's venv (.venv, for the client and the reference
# translation) and a registry for pip inside the build. The host's CA bundle is copied into the base
# and PIP_CERT points at it, so builds behind a TLS-inspecting proxy work as they do on the host.
#
# Environment: SEQSERVE_PODMAN_CACHE, DEBIAN_SUITE (bookworm: python3 is 3.11), DEBIAN_MIRROR,
# BASE_IMAGE, IMAGE, HOST_PORT, HOST_METRICS_PORT, PODMAN_BUILD_FLAGS (e.g. "--no-cache"),
# KEEP=1 (keep the containers for inspection).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
CACHE=${SEQSERVE_PODMAN_CACHE:-/var/tmp/seqserve-podman}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=${BASE_IMAGE:-localhost/seqserve-debian-python:$SUITE}
IMAGE=${IMAGE:-localhost/seqserve:smoke}
HOST_PORT=${HOST_PORT:-50151}
HOST_METRICS_PORT=${HOST_METRICS_PORT:-50152}
MODEL_DIR=${1:-runs/dates-model}
PY=$REPO/.venv/bin/python
BIN=$REPO/.venv/bin
PODMAN=(podman --runtime runc)
# Rootful podman asks runc for high RLIMIT_NOFILE/NPROC by default; where the host's hard limits
# are lower (as in this sandbox) runc fails with "error setting rlimit type 7 (or 6)".
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
CONTAINERS=()
T0=$SECONDS

say() { printf '[podman-smoke %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }
cleanup() {
    local c
    if [[ "${KEEP:-0}" != 1 ]]; then
        for c in "${CONTAINERS[@]}"; do podman rm --force --time 0 "$c" >/dev/null 2>&1 || true; done
    fi
}
trap cleanup EXIT

[[ $EUID -eq 0 ]] || fail "run as root (rootful podman with chroot isolation and runc)"
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install podman buildah runc debootstrap)"
done
[[ -x $PY && -x $BIN/seqserve-client ]] || fail "no project venv at $REPO/.venv (make install)"
[[ -f $MODEL_DIR/config.json ]] || fail "$MODEL_DIR is not a model directory (make export, or pass one)"
MODEL_ABS=$(cd "$MODEL_DIR" && pwd)
MODEL_REL=$(realpath --relative-to="$REPO" "$MODEL_ABS")
say "podman $(podman version --format '{{.Client.Version}}'), buildah $(buildah version --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["version"])'), $(runc --version | head -1)"

# ---- 1. the local Debian base ---------------------------------------------------------------
make_base() {
    local tar=$CACHE/debian-$SUITE-python.tar rootfs=$CACHE/rootfs-$SUITE
    mkdir -p "$CACHE"
    if [[ ! -f $tar ]]; then
        if [[ ! -x $rootfs/usr/bin/python3 ]]; then
            say "debootstrap $SUITE (minbase + python3, python3-venv, ca-certificates) into $rootfs"
            rm -rf "$rootfs.tmp"
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                "$SUITE" "$rootfs.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
                || { tail -20 "$CACHE/debootstrap.log"; fail "debootstrap (log: $CACHE/debootstrap.log)"; }
            mv "$rootfs.tmp" "$rootfs"
        fi
        # The host's trust store, so pip in the build trusts what pip on the host trusts.
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
        say "packing $rootfs into $tar"
        tar --numeric-owner -C "$rootfs" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
    fi
    say "podman import $tar $BASE_IMAGE"
    podman import --quiet --change 'CMD ["/bin/bash"]' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --message "debootstrap $SUITE minbase + python3" "$tar" "$BASE_IMAGE" >/dev/null
}
if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE already present (podman rmi it to rebuild)"
else
    make_base
fi
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$BASE_IMAGE" python3 --version | sed 's/^/    base: /'

# ---- 2. build ------------------------------------------------------------------------------------
build() {  # build TAG [--build-arg MODEL_DIR=...]
    local tag=$1 rc=0 log
    shift
    log=$CACHE/build-${tag//[^A-Za-z0-9]/_}.log
    say "podman build --isolation chroot --format docker --target server -t $tag $*"
    local started=$SECONDS
    # shellcheck disable=SC2086  # PODMAN_BUILD_FLAGS: several flags, split on purpose
    podman build --isolation chroot --format docker --target server "${ULIMITS[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" "$@" ${PODMAN_BUILD_FLAGS:-} \
        -t "$tag" -f Dockerfile . > "$log" 2>&1 || rc=$?
    grep -v -E '^ *(Collecting|Downloading|Using cached|Obtaining) ' "$log" | sed 's/^/    build: /' || true
    ((rc == 0)) || fail "podman build of $tag exited with $rc (log: $log)"
    say "built $tag in $((SECONDS - started)) s: $(podman image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
}

# ---- 3-5. run, check, drain ---------------------------------------------------------------
wait_serving() {  # NAME: until the probe from the host says SERVING (or the container died)
    local name=$1 deadline=$((SECONDS + 120)) out=""
    while ((SECONDS < deadline)); do
        if [[ $(podman inspect "$name" --format '{{.State.Running}}') != true ]]; then
            podman logs "$name" | tail -20
            fail "container $name exited with $(podman inspect "$name" --format '{{.State.ExitCode}}')"
        fi
        if out=$("$PY" deploy/healthcheck.py "127.0.0.1:$HOST_PORT" --timeout 1 2>&1); then
            say "health from the host: $out"
            return 0
        fi
        sleep 0.5
    done
    podman logs "$name" | tail -20
    fail "not SERVING within 120 s (last: $out)"
}

generate_and_compare() {  # one real Generate through the published port == offline translate
    local texts=("25 November 2026" "Tuesday, the 5th of November 1985")
    local served expected
    served=$("$BIN/seqserve-client" generate --address "127.0.0.1:$HOST_PORT" --timeout 30 "${texts[@]}")
    expected=$("$BIN/seqserve" translate "$MODEL_ABS" "${texts[@]}" 2>/dev/null | cut -f2)
    printf '%s\n' "$served" | sed 's/^/    served: /'
    [[ "$served" == "$expected" ]] || fail "served output differs from offline translate: $(printf '%s' "$expected" | tr '\n' '|')"
    say "generate through 127.0.0.1:$HOST_PORT equals offline \`seqserve translate\`"
}

drain() {  # NAME: a call in flight, SIGTERM via podman stop, then the call and the exit status
    local name=$1 inputs client_pid client_rc exit_code steps_before
    steps() { curl -sf "http://127.0.0.1:$HOST_METRICS_PORT/metrics" | awk '$1 == "seqserve_step_seconds_count" {print int($2)}'; }
    steps_before=$(steps)
    inputs=$("$PY" -c 'from seqserve.model.data import dates_pairs; print("\n".join(p.source for p in dates_pairs(64, seed=7)))')
    printf '%s\n' "$inputs" | "$BIN/seqserve-client" generate --address "127.0.0.1:$HOST_PORT" --timeout 60 \
        --min-new-tokens 24 --max-new-tokens 24 > "$CACHE/drain-call.out" 2>&1 &
    client_pid=$!
    # In flight for sure: wait until the server's step counter moves (the container runs with one
    # batch row, so 64 inputs x 24 tokens take over 1,500 decoder steps) while the call still runs.
    local deadline=$((SECONDS + 30))
    until (($(steps) > steps_before + 10)); do
        ((SECONDS < deadline)) || fail "the call never showed up in the server's metrics"
        kill -0 "$client_pid" 2>/dev/null || fail "the call finished before it could be caught in flight"
        sleep 0.02
    done
    say "podman stop --time 60 $name (SIGTERM, SIGKILL only after 60 s)"
    local started=$SECONDS
    podman stop --time 60 "$name" >/dev/null 2>>"$CACHE/$name.run.err"
    client_rc=0; wait "$client_pid" || client_rc=$?
    exit_code=$(podman inspect "$name" --format '{{.State.ExitCode}}')
    local logs  # read once: `grep -q` on a pipe would SIGPIPE podman logs, and pipefail report it
    logs=$(podman logs "$name" 2>&1)
    grep -E '"event": "(draining|stopped)"' <<< "$logs" | sed 's/^/    log: /'
    say "stopped in $((SECONDS - started)) s, exit code $exit_code; call in flight: exit $client_rc, $(wc -l < "$CACHE/drain-call.out") outputs"
    [[ $client_rc -eq 0 && $(wc -l < "$CACHE/drain-call.out") -eq 64 ]] || { cat "$CACHE/drain-call.out"; fail "the call in flight at SIGTERM"; }
    [[ $exit_code -eq 0 ]] || fail "exit code $exit_code after SIGTERM"
    grep -qE '"event": "draining", "in_flight": [1-9]' <<< "$logs" || fail "no call in flight at SIGTERM"
    grep -q '"event": "stopped", "drained": true' <<< "$logs" || fail "no clean drain in the log"
}

run_container() {  # NAME IMAGE [podman run flags...]
    local name=$1 image=$2; shift 2
    CONTAINERS+=("$name")
    podman rm --force --time 0 "$name" >/dev/null 2>&1 || true
    say "podman --runtime runc run ${ULIMITS[*]} -p 127.0.0.1:$HOST_PORT:50051 -p 127.0.0.1:$HOST_METRICS_PORT:8000 $* $image"
    # Without systemd, podman logs errors about the periodic health timer: harmless here
    # (`podman healthcheck run` runs the image's HEALTHCHECK on demand), so they go to a file.
    "${PODMAN[@]}" run --detach --name "$name" "${ULIMITS[@]}" \
        -p "127.0.0.1:$HOST_PORT:50051" -p "127.0.0.1:$HOST_METRICS_PORT:8000" "$@" "$image" \
        >/dev/null 2>"$CACHE/$name.run.err" || { cat "$CACHE/$name.run.err"; fail "podman run"; }
}

mkdir -p "$CACHE"
if [[ $MODEL_REL != ../* ]]; then
    build "$IMAGE" --build-arg MODEL_DIR="$MODEL_REL"
    # SEQSERVE_* configuration through the environment: one batch row, so the drain below has work.
    run_container seqserve-smoke "$IMAGE" -e SEQSERVE_MAX_BATCH_SIZE=1
    wait_serving seqserve-smoke
    if podman healthcheck run seqserve-smoke >/dev/null 2>&1; then
        say "the image's HEALTHCHECK (podman healthcheck run): healthy"
    else
        fail "podman healthcheck run: $(podman healthcheck run seqserve-smoke 2>&1 | tail -1)"
    fi
    podman exec seqserve-smoke sh -c 'id; test ! -e /opt/venv/lib/python3*/site-packages/torch && echo "no torch in the image"' \
        | sed 's/^/    inside: /'
    batch=$("$BIN/seqserve-client" info --json --address "127.0.0.1:$HOST_PORT" \
            | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["limits"]["max_batch_size"])')
    [[ $batch == 1 ]] || fail "SEQSERVE_MAX_BATCH_SIZE=1 not applied (server says max_batch_size $batch)"
    say "configured through the environment: GetModelInfo says max_batch_size $batch (SEQSERVE_MAX_BATCH_SIZE=1)"
    metrics=$(curl -sf "http://127.0.0.1:$HOST_METRICS_PORT/metrics" | grep -c '^seqserve_' || true)
    ((metrics > 0)) || fail "no seqserve_* metrics on 127.0.0.1:$HOST_METRICS_PORT"
    say "/metrics on 127.0.0.1:$HOST_METRICS_PORT: $metrics seqserve_* samples"
    generate_and_compare
    drain seqserve-smoke
else
    say "$MODEL_DIR is outside the build context: skipping the baked-in image"
fi

# ---- 6. no model baked in: mount one at /model ----------------------------------------------------
build "$IMAGE-nomodel"
# The server runs as uid 10001: the mounted directory must be readable by it (an export is 0700).
rm -rf "$CACHE/mounted-model" && cp -r "$MODEL_ABS" "$CACHE/mounted-model" && chmod -R a+rX "$CACHE/mounted-model"
run_container seqserve-smoke-mounted "$IMAGE-nomodel" -v "$CACHE/mounted-model:/model:ro" -e SEQSERVE_MAX_BATCH_SIZE=1
wait_serving seqserve-smoke-mounted
generate_and_compare
drain seqserve-smoke-mounted

say "PASSED: built from a local Debian base, served, answered through 127.0.0.1:$HOST_PORT, drained on SIGTERM with exit 0"

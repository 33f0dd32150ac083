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
#   deploy/podman-smoke.sh --print-sources    the package sources it would use, then exit (no root)
#   make podman-smoke MODEL=runs/dates-model
#
# Needs root, podman, buildah's chroot isolation, runc and debootstrap (Debian: apt-get install
# podman buildah runc debootstrap) and the project's venv (.venv, for the client and the reference
# translation). Packages come from where the host gets its own, so it runs where only a local
# mirror is reachable: debootstrap uses the host's Debian archive (the first `deb` source of
# component main, outside the security/updates/backports suites, in /etc/apt/sources.list,
# sources.list.d/*.list and the deb822 sources.list.d/*.sources; file: and http(s): URIs), and pip
# inside the build gets the host pip's index settings (`pip config list`: its files, then
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_NO_INDEX) as an
# /etc/pip.conf mounted for the RUN steps only, with the local directories they name mounted at the
# same paths. The host's CA bundle is copied into the base and PIP_CERT points at it, so builds
# behind a TLS-inspecting proxy work as they do on the host.
#
# Environment: SEQSERVE_PODMAN_CACHE, DEBIAN_SUITE (bookworm: python3 is 3.11), DEBIAN_MIRROR (a
# URL: instead of the host's apt sources), APT_SOURCES_DIR (where those are read: /etc/apt),
# PIP_INDEX_URL and the other PIP_* above (as for pip on the host), BASE_IMAGE, IMAGE, HOST_PORT,
# HOST_METRICS_PORT, PODMAN_BUILD_FLAGS (e.g. "--no-cache"), KEEP=1 (keep the containers).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
CACHE=${SEQSERVE_PODMAN_CACHE:-/var/tmp/seqserve-podman}
SUITE=${DEBIAN_SUITE:-bookworm}
APT_SOURCES_DIR=${APT_SOURCES_DIR:-/etc/apt}
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

# ---- 0. the package sources: the host's own -----------------------------------------------------
apt_source_files() {  # what apt reads, in its order: sources.list, then sources.list.d by name
    local f
    [[ -f $APT_SOURCES_DIR/sources.list ]] && printf '%s\n' "$APT_SOURCES_DIR/sources.list"
    for f in "$APT_SOURCES_DIR"/sources.list.d/*; do
        [[ -f $f && ($f == *.list || $f == *.sources) ]] && printf '%s\n' "$f"
    done
    return 0
}

apt_archive_sources() {  # FILE...: "URI<tab>SUITE<tab>FILE" for each deb source of component main
    # One-line files (*.list: `deb [options] URI SUITE COMPONENT...`) and deb822 stanzas (*.sources:
    # Types, URIs, Suites, Components, `Enabled: no`, continuation lines). Security, updates and
    # backports suites are not the archive debootstrap needs; file:/x becomes file:///x for it.
    awk -v OFS='\t' '
        function has(list, word,   a, n, i) {
            n = split(list, a, /[ \t]+/)
            for (i = 1; i <= n; i++) if (a[i] == word) return 1
            return 0
        }
        function emit(types, uris, suites, comps, file,   u, s, nu, ns, i, j, uri) {
            if (!has(types, "deb") || !has(comps, "main")) return
            nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
            for (i = 1; i <= nu; i++) {
                uri = u[i]
                if (uri !~ /^(https?|file):/) continue
                if (uri ~ /^file:\/[^\/]/) sub(/^file:/, "file://", uri)
                sub(/\/+$/, "", uri)
                for (j = 1; j <= ns; j++)
                    if (s[j] != "" && s[j] !~ /[-\/](security|updates|backports)$/) print uri, s[j], file
            }
        }
        function field(name, value, more) {
            if (name == "types") types = more ? types " " value : value
            else if (name == "uris") uris = more ? uris " " value : value
            else if (name == "suites") suites = more ? suites " " value : value
            else if (name == "components") comps = more ? comps " " value : value
            else if (name == "enabled") enabled = value
        }
        function stanza() {
            if (types != "" && tolower(enabled) != "no") emit(types, uris, suites, comps, file)
            types = uris = suites = comps = enabled = key = ""
        }
        FNR == 1 { stanza(); file = FILENAME }
        file ~ /\.list$/ {
            sub(/#.*/, "")
            if ($1 != "deb") next
            i = 2
            if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
            line_comps = ""
            for (j = i + 2; j <= NF; j++) line_comps = line_comps " " $j
            emit("deb", $i, $(i + 1), line_comps, file)
            next
        }
        /^#/ { next }
        /^[ \t]*$/ { stanza(); next }
        /^[ \t]/ { value = $0; sub(/^[ \t]+/, "", value); field(key, value, 1); next }
        {
            key = tolower($0); sub(/:.*/, "", key)
            value = $0; sub(/^[^:]*:[ \t]*/, "", value)
            field(key, value, 0)
        }
        END { stanza() }
    ' "$@"
}

debian_mirror() {  # MIRROR, MIRROR_FROM: DEBIAN_MIRROR, else the host's archive ($SUITE's first)
    local files=() uri suite file first=""
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then
        MIRROR=$DEBIAN_MIRROR MIRROR_FROM="DEBIAN_MIRROR"
        return 0
    fi
    mapfile -t files < <(apt_source_files)
    if ((${#files[@]})); then
        while IFS=$'\t' read -r uri suite file; do
            [[ -n $first ]] || first="$uri"$'\t'"$file, suite $suite"
            if [[ $suite == "$SUITE" ]]; then
                MIRROR=$uri MIRROR_FROM="$file, suite $suite"
                return 0
            fi
        done < <(apt_archive_sources "${files[@]}")
    fi
    if [[ -n $first ]]; then  # no $SUITE source: the host's Debian archive carries the other releases
        MIRROR=${first%%$'\t'*} MIRROR_FROM=${first#*$'\t'}
        return 0
    fi
    local names="nothing: no $APT_SOURCES_DIR/sources.list, sources.list.d/*.list or *.sources"
    ((${#files[@]} == 0)) || { names=$(printf '%s, ' "${files[@]}"); names=${names%, }; }
    fail "no Debian mirror in the host's apt sources (read $names; none has a deb source of component" \
         "main outside security/updates suites): set DEBIAN_MIRROR to a Debian mirror URL"
}

pip_index_settings() {  # the host pip's index settings as pip.conf lines, then "mount DIR" lines
    local py=$PY
    [[ -x $py ]] || py=python3
    # `pip config list` shows pip's files and its PIP_* variables (":env:") alike; `pip install`
    # takes global, then install, then the environment. Only where packages come from: the image's
    # own pip settings (PIP_CONSTRAINT, PIP_CERT, ...) stay as the Dockerfile and the base set them.
    "$py" - <<'EOF'
import ast, os, subprocess, sys
from urllib.parse import unquote, urlsplit

KEYS = ("index-url", "extra-index-url", "find-links", "trusted-host", "no-index")
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                        capture_output=True, text=True, check=True).stdout
found = {}
for line in listed.splitlines():
    name, sep, value = line.partition("=")
    section, _, key = name.partition(".")
    if sep and key in KEYS and section in ("global", "install", ":env:"):
        found.setdefault(key, {})[section] = ast.literal_eval(value)
mounts = []
for key in KEYS:
    value = next((found[key][s] for s in (":env:", "install", "global") if s in found.get(key, {})), None)
    if value is None:
        continue
    words = value.split()
    if not words:  # set empty (PIP_FIND_LINKS=): nothing, as for pip
        continue
    for i, word in enumerate(words):
        if word.startswith("file:"):
            local = unquote(urlsplit(word).path)
        elif key == "find-links" and "://" not in word:  # a path: absolute, as the build sees it
            local = words[i] = os.path.abspath(word)
        else:
            continue
        if not os.path.exists(local):
            continue
        if key.endswith("index-url"):  # a file: index links to files beside it (../../files/...)
            local = os.path.dirname(local.rstrip("/"))
        elif not os.path.isdir(local):
            local = os.path.dirname(local)
        if os.path.normpath(local) != "/":
            mounts.append(os.path.normpath(local))
    print(f"{key} = {' '.join(words)}")
for d in sorted(set(mounts)):  # one mount per tree
    if not any(d.startswith(other + "/") for other in mounts):
        print(f"mount {d}")
EOF
}

pip_for_build() {  # PIP_MOUNTS: podman build --volume flags giving the build the host pip's index
    local settings conf dirs=() dir
    settings=$(pip_index_settings) || fail "pip config list failed: the host pip's index settings are unknown"
    conf=$(grep -v '^mount ' <<< "$settings" || true)
    mapfile -t dirs < <(sed -n 's/^mount //p' <<< "$settings")
    PIP_MOUNTS=()
    if [[ -z $conf ]]; then
        say "pip in the build: its default index (the host's pip configures none)"
        return 0
    fi
    printf '# The host pip'\''s index settings, from deploy/podman-smoke.sh\n[global]\n%s\n' "$conf" > "$CACHE/pip.conf"
    PIP_MOUNTS=(--volume "$CACHE/pip.conf:/etc/pip.conf:ro")
    for dir in "${dirs[@]}"; do PIP_MOUNTS+=(--volume "$dir:$dir:ro"); done
    say "pip in the build: /etc/pip.conf with the host's ${conf//$'\n'/; }${dirs[*]:+; mounted: ${dirs[*]}}"
}

case ${1:-} in
    -h|--help)
        sed -n '2,/^set -euo/{s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0 ;;
    --print-sources)  # what the build would use, without root or podman
        debian_mirror
        printf 'debian mirror: %s (%s)\n' "$MIRROR" "$MIRROR_FROM"
        settings=$(pip_index_settings) || fail "pip config list failed: the host pip's index settings are unknown"
        [[ -z $settings ]] || sed 's/^mount /pip mount: /; t; s/^/pip: /' <<< "$settings"
        exit 0 ;;
esac

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
            debian_mirror
            say "Debian mirror: $MIRROR ($MIRROR_FROM)"
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
        --build-arg BASE_IMAGE="$BASE_IMAGE" "${PIP_MOUNTS[@]}" "$@" ${PODMAN_BUILD_FLAGS:-} \
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
pip_for_build
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

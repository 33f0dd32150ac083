# syntax=docker/dockerfile:1
# seqserve container images: one Dockerfile, several targets (README, "Deployment").
#
#   server (the default: last stage)   `seqserve serve` as a non-root user; a venv with the serving
#                                      dependencies only (no torch, no compilers); HEALTHCHECK over
#                                      grpc.health.v1; configured with SEQSERVE_* variables.
#       docker build -t seqserve:cpu --build-arg MODEL_DIR=runs/dates-model .      # model baked in
#       docker build -t seqserve:cpu .                                             # mount one at /model
#   trainer                            torch (CPU wheel) + the `train` extra: `seqserve train|export`.
#   model                              runs training + export while building: the model at /model.
#   model-dir                          only that directory, for `--output type=local,dest=DIR`.
#
# Build arguments:
#   BASE_IMAGE       the image everything starts from: any Debian/Ubuntu image with python3 >= 3.11
#                    (its venv module included), or a CUDA image without Python, which gets Ubuntu's
#                    python3. Default: the slim Python 3.11 image. For the GPU variant a CUDA + cuDNN
#                    runtime matching ONNX_RUNTIME_GPU: nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
#                    for onnxruntime-gpu 1.31 (CUDA 13, cuDNN 9). deploy/podman-smoke.sh passes a
#                    locally bootstrapped Debian here.
#   VARIANT          cpu: onnxruntime (the `cpu` extra); gpu: onnxruntime-gpu (the `gpu` extra).
#                    Never both in one image (the builder checks).
#   ONNX_RUNTIME_GPU the onnxruntime-gpu release the gpu variant is pinned to (it must match BASE_IMAGE's CUDA).
#   MODEL_DIR        an exported model directory inside the build context, copied to /model. The
#                    default is an empty placeholder: mount a model directory at /model instead.
#   TORCH_INDEX_URL  where the trainer's torch comes from; the CPU wheel index keeps it small.
#
#   GPU:  docker build -t seqserve:gpu --build-arg VARIANT=gpu \
#             --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 --build-arg MODEL_DIR=... .
#   (one flag instead of two is not possible: buildah 1.28 cannot pick a stage by a build argument.)

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu
ARG ONNX_RUNTIME_GPU=1.31.1

# ---- base: python3 and the pip settings every stage shares -----------------------------------
FROM ${BASE_IMAGE} AS base
ARG VARIANT
ARG ONNX_RUNTIME_GPU
# A CUDA base comes without Python: Ubuntu's python3 follows the release the base fixes. The gpu
# variant pins onnxruntime-gpu through a constraints file pip reads in every later stage.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if [ "${VARIANT}" = gpu ]; then echo "onnxruntime-gpu==${ONNX_RUNTIME_GPU}"; fi > /etc/pip-constraints.txt
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/pip-constraints.txt \
    PATH=/opt/venv/bin:$PATH

# ---- the package source, and nothing else (.dockerignore keeps the context small too) ----------
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY server/ server/
COPY bench/ bench/
COPY client/ client/
COPY proto/ proto/

# ---- builder: the serving venv (the package and its `cpu` or `gpu` extra; no torch) ------------
FROM source AS builder
ARG VARIANT
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "/src[${VARIANT}]" \
    && pip uninstall --yes pip \
    && python3 -c "import sys, importlib.metadata as m; \
ort = sorted({x.metadata['Name'].lower() for x in m.distributions()} & {'onnxruntime', 'onnxruntime-gpu'}); \
print('ONNX Runtime packages:', ort); sys.exit(len(ort) != 1)"

# ---- trainer: training + export (torch from TORCH_INDEX_URL first, then the `train` extra) -----
FROM source AS trainer
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "/src[${VARIANT},train]" \
    && useradd --uid 10001 --user-group --create-home --home-dir /work --shell /usr/sbin/nologin seqserve
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["seqserve"]
CMD ["--help"]

# ---- model: the training + export pipeline, run while building ----------------------------------
FROM trainer AS model
ARG TASK=dates
ARG PRESET=demo
# Extra `seqserve train` flags, split on spaces on purpose.
ARG TRAIN_ARGS="--epochs 12 --lr-scale 0.5 --target-exact-match 0.99 --max-minutes 4.5"
# hadolint ignore=SC2086
RUN seqserve train --task "${TASK}" --preset "${PRESET}" --device cpu --out /work/run ${TRAIN_ARGS} \
    && seqserve export /work/run/checkpoint.pt --out /work/model

FROM scratch AS model-dir
COPY --from=model /work/model/ /

# ---- server: the runtime image (the default target) ----------------------------------------------
FROM base AS server
ARG MODEL_DIR=deploy/no-model
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin seqserve
COPY --from=builder /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/seqserve/healthcheck.py
COPY ${MODEL_DIR}/ /model/
# Every `seqserve serve` flag has a SEQSERVE_* variable (`seqserve serve --help`); set more with -e.
ENV SEQSERVE_MODEL_DIR=/model \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=8000 \
    SEQSERVE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051 8000
# grpc.health.v1 Check of seqserve.v1.SeqServe on SEQSERVE_PORT: NOT_SERVING while loading and draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/seqserve/healthcheck.py"]
# SIGTERM (the default stop signal): NOT_SERVING, new calls UNAVAILABLE, in-flight calls get
# SEQSERVE_GRACE_PERIOD seconds (20) to finish, exit 0. Give `docker stop -t` more than that.
ENTRYPOINT ["seqserve", "serve"]

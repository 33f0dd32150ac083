# seqserve: the two set-up commands of the README, and the pieces they are made of.
# `make demo`: environment, train the demo model, export + verify it, translate sample dates.
# `make test`: environment, then the whole default test suite (what CI runs).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs
SAMPLES := "Tuesday, the 5th of November 1985" "nov 25 2026" "03/14/2015" "1 JANUARY 1900" "Sat 29 Feb 2020"

.PHONY: demo test test-slow gpu-check install train export translate serve-demo proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and exactly: the CPU wheel of 2.13.0 lies on this machine's disk, and anything
# looser would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[cpu,train,dev,tracing]"
	touch $@

# The training pass's fused CPU kernels, compiled once per machine (and again when their source
# changes) into a cache, so that the first `seqserve train` does not wait for the compiler. Without
# a compiler this says so, and training uses PyTorch operations instead.
$(VENV)/.kernels: $(VENV)/.installed model/fused_kernels.cpp
	$(BIN)/python -m seqserve.model.kernels
	touch $@

install: $(VENV)/.installed $(VENV)/.kernels

# The trainer's defaults; it stops once held-out exact match reaches 99%, and the budget is a ceiling.
train: install
	$(BIN)/seqserve train --task dates --out $(RUN)/dates --target-exact-match 0.99 --max-minutes 5

export: train
	$(BIN)/seqserve export $(RUN)/dates/checkpoint.pt --out $(RUN)/dates-model --force

translate: export
	$(BIN)/seqserve translate $(RUN)/dates-model $(SAMPLES)

# The exported model served over gRPC on loopback and called with the client, then a clean SIGTERM.
DEMO_PORT ?= 50551
serve-demo: export
	$(BIN)/seqserve serve $(RUN)/dates-model --host 127.0.0.1 --port $(DEMO_PORT) --log-format text --log-level warning & \
	pid=$$!; \
	$(BIN)/seqserve-client health --address 127.0.0.1:$(DEMO_PORT) --wait 60 \
	&& $(BIN)/seqserve-client generate --address 127.0.0.1:$(DEMO_PORT) $(SAMPLES) \
	&& $(BIN)/seqserve-client generate --address 127.0.0.1:$(DEMO_PORT) --stream "the 1st of May 2000"; \
	status=$$?; kill -TERM $$pid; wait $$pid; exit $$status

demo: translate serve-demo

test: install
	$(BIN)/pytest -m "not slow"

test-slow: install
	$(BIN)/pytest -m slow

# On a host with an NVIDIA GPU: its own environment with the GPU extra, every CUDA test, and a
# short bench / bench-serve on CUDA (deploy/gpu-check.sh says what each step proves).
gpu-check:
	PYTHON=$(PYTHON) bash deploy/gpu-check.sh

# Regenerate the gRPC/protobuf code in proto/ from proto/seqserve.proto (grpcio-tools, pinned
# in the dev extra); commit the result: tests/server/test_proto.py fails when it is stale.
proto: install
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(RUN) .pytest_cache

# Container images (README, "Deployment"): docker or podman. MODEL is baked in at /model;
# `make image MODEL=` builds an image without one (mount a model directory at /model instead).
CONTAINER ?= docker
MODEL ?= $(RUN)/dates-model
CUDA_IMAGE ?= nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
.PHONY: image image-gpu image-trainer podman-smoke

image:
	$(CONTAINER) build -t seqserve:cpu --target server $(if $(MODEL),--build-arg MODEL_DIR=$(MODEL)) .

image-gpu:
	$(CONTAINER) build -t seqserve:gpu --target server --build-arg VARIANT=gpu \
		--build-arg BASE_IMAGE=$(CUDA_IMAGE) $(if $(MODEL),--build-arg MODEL_DIR=$(MODEL)) .

image-trainer:
	$(CONTAINER) build -t seqserve:trainer --target trainer .

# The opt-in container proof without a Docker engine (root, podman, buildah, runc, debootstrap):
# a debootstrapped Debian base, the CPU image built from it, served, called, drained. Not in `make test`.
podman-smoke: install
	bash deploy/podman-smoke.sh $(MODEL)

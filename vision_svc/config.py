"""The vision stage's configuration: one frozen dataclass, built from the command line in one place."""

import argparse
import dataclasses
import pathlib

from protos.cli import HelpFormatter, add_security_flags, pop_security_args
from protos.security import TlsFiles, check_server_settings
from protos.tracing import add_tracing_flag
from vision_svc.image_decode import MIB, ImageLimits
from vision_svc.video_decode import VideoLimits

GIB = 1 << 30
# What an EncodeResponse carries besides its chunk of embedding bytes: the image index, its header, flags.
RESPONSE_HEADER_ROOM_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    model: pathlib.Path
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = None
    device: str = "cpu"
    dtype: str = "auto"
    kernel_backend: str | None = None
    threads: int | None = None  # torch's intra-op threads; None: the CPUs this process may use, less one
    max_batch_tiles: int = 32
    batch_wait_ms: float = 5.0
    max_queue_tiles: int = 1024
    max_pending_images: int = 256
    max_tiles: int | None = None
    max_images_per_request: int = 16
    max_image_bytes: int = ImageLimits.max_image_bytes
    max_image_pixels: int = ImageLimits.max_image_pixels
    # Videos (vision_svc/video_decode.py): each sampled frame is one tile.
    max_videos_per_request: int = 2
    max_video_bytes: int = VideoLimits.max_video_bytes
    max_video_frames: int = VideoLimits.max_frames
    max_video_seconds: float = VideoLimits.max_seconds
    max_video_frame_pixels: int = VideoLimits.max_frame_pixels
    cache_bytes: int = 2 * GIB
    preprocess_workers: int = 2
    preprocess_pool: str = "auto"  # threads or processes; auto: threads for a CPU encoder (VisionServer)
    preprocess_on: str = "host"
    decode_on: str = "host"
    compile: bool = False
    chunk_bytes: int = 1 * MIB
    max_message_bytes: int = 64 * MIB
    # Work held at once: Encode requests being served, and the bytes of their messages.
    max_requests_in_flight: int = 1024
    max_bytes_in_flight: int = 2 * GIB
    grace_s: float = 30.0
    stall_timeout_s: float = 60.0  # vision_svc/progress.py: NOT_SERVING when no image work finishes for so long
    log_level: str = "INFO"
    log_json: bool = False
    tls: TlsFiles = TlsFiles()
    health_port: int | None = None
    reflection: bool = True
    auth_token: str | None = dataclasses.field(default=None, repr=False)  # a secret: kept out of logs
    # The embedding data plane (vision_svc/transport_sender.py): transports served besides gRPC inline.
    embedding_transports: str = "shm,socket"
    shm_dir: str = "/dev/shm"
    data_port: int = 0
    mooncake_protocol: str = "tcp"
    otlp_traces_endpoint: str | None = None  # protos.tracing: with the OTEL_* variables, where spans go

    def __post_init__(self):
        check_server_settings(self.tls, self.port, self.health_port, self.metrics_port)
        positive = ("max_batch_tiles", "max_queue_tiles", "max_pending_images", "max_images_per_request",
                    "max_image_bytes", "max_image_pixels", "chunk_bytes", "max_message_bytes",
                    "max_requests_in_flight", "max_bytes_in_flight")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if self.max_tiles is not None and not 1 <= self.max_tiles <= 64:
            raise ValueError(f"--max-tiles must be in [1, 64], got {self.max_tiles}")
        if self.max_queue_tiles < self.max_batch_tiles:
            raise ValueError("--max-queue-tiles must be at least --max-batch-tiles")
        if self.max_bytes_in_flight < self.max_message_bytes:
            # Else the largest request could never be admitted, and would get RESOURCE_EXHAUSTED forever.
            raise ValueError(f"--max-bytes-in-flight ({self.max_bytes_in_flight}) is below what one request may "
                             f"hold, --max-message-bytes ({self.max_message_bytes}); raise it or lower that")
        if self.chunk_bytes + RESPONSE_HEADER_ROOM_BYTES > self.max_message_bytes:
            raise ValueError("--chunk-bytes must leave room for headers under --max-message-bytes")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype}")
        if self.preprocess_on not in ("host", "device"):
            raise ValueError(f"--preprocess-on must be host or device, got {self.preprocess_on}")
        if self.decode_on not in ("host", "device"):
            raise ValueError(f"--decode-on must be host or device, got {self.decode_on}")
        if self.decode_on == "device" and self.preprocess_on != "device":
            raise ValueError("--decode-on device needs --preprocess-on device (the decoded pixels stay on the device)")
        if self.decode_on == "device" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--decode-on device decodes with torchvision, which runs on cpu or cuda, "
                             f"not on {self.device}")
        if not set(filter(None, self.embedding_transports.split(","))) <= {"shm", "socket", "grpc", "mooncake",
                                                                            "device_ipc"}:
            raise ValueError(f"--embedding-transports takes shm, socket, mooncake, device_ipc and grpc, got "
                             f"{self.embedding_transports!r}")
        if not 0 <= self.data_port <= 65535:
            raise ValueError(f"--data-port must be in [0, 65535], got {self.data_port}")
        if self.max_videos_per_request < 0:
            raise ValueError(f"--max-videos-per-request must be >= 0, got {self.max_videos_per_request}")
        for name in ("max_video_bytes", "max_video_frames", "max_video_seconds", "max_video_frame_pixels"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.preprocess_pool not in ("auto", "threads", "processes"):
            raise ValueError(f"--preprocess-pool takes auto, threads or processes, got {self.preprocess_pool!r}")
        if min(self.batch_wait_ms, self.grace_s, self.preprocess_workers, self.cache_bytes, self.stall_timeout_s) < 0:
            raise ValueError("--batch-wait-ms, --grace-s, --preprocess-workers, --cache-bytes and --stall-timeout-s "
                             "must be >= 0")


def build_parser() -> argparse.ArgumentParser:
    d = VisionConfig(model=pathlib.Path("."))
    p = argparse.ArgumentParser(
        prog="python -m vision_svc",
        description="The InternVL vision stage: encodes images into language-model embeddings and streams "
                    "them over gRPC (internvl.vision.v1.VisionEncoder, with grpc.health.v1 and reflection).",
        formatter_class=HelpFormatter)
    p.add_argument("--model", type=pathlib.Path, required=True,
                   help="InternVL checkpoint directory, original (OpenGVLab) or transformers-native layout; "
                        "only its vision tensors are read")
    p.add_argument("--served-model-name", default=None, help="name reported by GetInfo (default: directory name)")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port (0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--device", default=d.device, help="cpu, cuda[:i] or npu[:i]")
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16; auto = float32 on cpu, "
                                                     "bfloat16 on accelerators. On a CPU whose oneDNN has no "
                                                     "kernels for bfloat16 (no AVX-512) or float16, the "
                                                     "encoder's matmuls run in float32 and round to it")
    p.add_argument("--kernel-backend", default=None,
                   help="force a kernels backend (reference, cpu, cuda, npu); default: the best for the device")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the encoder (and other host-side tensor work); default: the CPUs this "
                        "process may run on less one (at least 1), which is left to the event loop and the "
                        "preprocessing workers. More threads than free cores make a CPU forward pass several "
                        "times slower, as each waits for the others at every operator")
    p.add_argument("--max-batch-tiles", type=int, default=d.max_batch_tiles,
                   help="most tiles in one encoder forward pass, across concurrent requests")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="longest wait for more tiles before running a partly filled batch, taken only while "
                        "other images are being preprocessed (a lone image runs at once)")
    p.add_argument("--max-queue-tiles", type=int, default=d.max_queue_tiles,
                   help="tiles allowed to wait for the encoder; beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--max-pending-images", type=int, default=d.max_pending_images,
                   help="images being decoded, tiled or encoded at once; beyond it requests get "
                        "RESOURCE_EXHAUSTED before any work (bounds memory under floods)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="limit and default for tiles per image, thumbnail excluded (default: the model's "
                        "max_dynamic_patch)")
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request,
                   help="most images in one request")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="most encoded bytes per image")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="most pixels (width x height) per image, checked before decoding (decompression bombs)")
    p.add_argument("--max-videos-per-request", type=int, default=d.max_videos_per_request,
                   help="most videos in one request (0: videos are refused)")
    p.add_argument("--max-video-bytes", type=int, default=d.max_video_bytes, help="most encoded bytes per video")
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                   help="most frames sampled per video (one tile, 256 prompt tokens each)")
    p.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds,
                   help="longest video, by its header, in seconds")
    p.add_argument("--max-video-frame-pixels", type=int, default=d.max_video_frame_pixels,
                   help="most pixels (width x height) per video frame, checked from the header before decoding")
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes,
                   help="embedding cache size in bytes (0 disables it)")
    p.add_argument("--preprocess-workers", type=int, default=d.preprocess_workers,
                   help="workers decoding and tiling images (0: one thread of this process)")
    p.add_argument("--preprocess-pool", choices=("auto", "threads", "processes"), default=d.preprocess_pool,
                   help="what the preprocessing workers are. threads: no copy of the tiles between processes "
                        "(Pillow and numpy run outside the GIL), the cheapest where the encoder shares the host's "
                        "CPUs; processes: decoding isolated from the server and no GIL between many workers, for "
                        "a fast encoder fed by many cores. auto: threads with --device cpu, else processes")
    p.add_argument("--preprocess-on", choices=("host", "device"), default=d.preprocess_on,
                   help="where images are resized, tiled and normalized: host (the preprocessing workers, "
                        "Pillow) or device (the encoder's device, after the workers decode)")
    p.add_argument("--decode-on", choices=("host", "device"), default=d.decode_on,
                   help="where JPEGs are decoded with --preprocess-on device: host (the preprocessing workers) or "
                        "device (torchvision's decode_jpeg, nvJPEG on CUDA); other formats always decode on the "
                        "host")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder for batch sizes padded up to a few buckets (1, 2, 4, 8, 13, "
                        "16, 32, ... up to --max-batch-tiles), each compiled at start; CUDA graphs for small "
                        "buckets on CUDA")
    p.add_argument("--chunk-bytes", type=int, default=d.chunk_bytes, help="embedding bytes per streamed message")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="gRPC message limit; an Encode request carries all its images, so it bounds their sum")
    p.add_argument("--max-requests-in-flight", type=int, default=d.max_requests_in_flight,
                   help="most Encode requests served at once; beyond it a request gets RESOURCE_EXHAUSTED at once, "
                        "with a retry-after-s hint (llm_svc tries another replica)")
    p.add_argument("--max-bytes-in-flight", type=int, default=d.max_bytes_in_flight,
                   help="most bytes of Encode requests (their images) held at once by the requests being served; "
                        "a request that would pass it gets RESOURCE_EXHAUSTED with a retry-after-s hint. At least "
                        "--max-message-bytes, what one request may hold")
    p.add_argument("--grace-s", type=float, default=d.grace_s,
                   help="on SIGTERM, seconds that in-flight requests get to finish")
    p.add_argument("--stall-timeout-s", type=float, default=d.stall_timeout_s,
                   help="when images are in hand and none has finished preprocessing or an encoder pass for this "
                        "long (a hung device, a stuck worker), health turns NOT_SERVING, so that callers send "
                        "their images to other replicas and a liveness probe restarts this one, and the images in "
                        "hand fail UNAVAILABLE for their callers to retry elsewhere; SERVING again once work moves "
                        "(0: never)")
    p.add_argument("--embedding-transports", default=d.embedding_transports,
                   help="how embedding bytes may reach callers besides gRPC inline (always served), comma-separated: "
                        "shm (shared memory, callers on this host, proven by a probe), socket (a TCP connection "
                        "to --data-port; not served with TLS, as its bytes are not encrypted), mooncake (Mooncake "
                        "Transfer Engine, when its package is installed) and device_ipc (CUDA/NPU IPC handles to "
                        "callers on this host, for embeddings held on a device; others go inline); '' for inline "
                        "only")
    p.add_argument("--shm-dir", default=d.shm_dir,
                   help="shared-memory directory that callers on this host create their slots in (tmpfs)")
    p.add_argument("--data-port", type=int, default=d.data_port,
                   help="TCP port of the socket transport, on --host (0 picks a free one, told to callers)")
    p.add_argument("--mooncake-protocol", choices=("tcp", "rdma"), default=d.mooncake_protocol,
                   help="protocol of the mooncake transport's engine")
    p.add_argument("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    add_security_flags(p.add_argument_group("security"), serves_grpc=True, peer=None)
    add_tracing_flag(p)
    return p


def parse_config(argv: list[str] | None = None) -> VisionConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = pop_security_args(args, peer=None)
        return VisionConfig(**vars(args), **security)
    except ValueError as error:
        parser.error(str(error))

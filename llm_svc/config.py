"""The language stage's configuration, built from the command line in one place.

Our own flags go into `LlmConfig`; every other flag is one of vLLM's engine arguments and passes through
unchanged into `AsyncEngineArgs` (parallelism, Ray, max-model-len, dtype, KV cache size, ...). Two engine
settings are forced, because they are what makes this the disaggregated language stage: image
embeddings come in (`enable_mm_embeds`) and the vision tower is not built (`limit_mm_per_prompt` 0 for
every modality). On a CPU, flags the user leaves out get values that start there (`cpu_defaults`).
"""

import argparse
import dataclasses

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.utils.argparse_utils import FlexibleArgumentParser

from llm_svc.cpu_defaults import CpuDefaults, GiB, MiB, pick_cpu_defaults, read_cpu_machine
from llm_svc.embedding_receiver import TRANSPORT_CHOICES
from protos.cli import add_security_flags, pop_security_args
from protos.endpoints import check_targets
from protos.security import TlsFiles, check_client_settings, check_server_settings

NO_VISION_TOWER = {"image": 0, "video": 0}


@dataclasses.dataclass(frozen=True)
class LlmConfig:
    vision: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 50052
    metrics_port: int | None = None
    max_images_per_request: int = 16
    vision_timeout_s: float = 120.0
    vision_start_timeout_s: float = 300.0
    max_message_bytes: int = 64 * MiB
    max_embedding_bytes: int = 512 * MiB
    # Work held at once: Generate requests being served, and the bytes they hold (messages, embeddings received).
    max_requests_in_flight: int = 1024
    max_bytes_in_flight: int = 2 * GiB
    grace_s: float = 30.0
    # The embedding data plane (llm_svc/embedding_receiver.py).
    embedding_transport: str = "auto"
    shm_dir: str = "/dev/shm"
    shm_max_bytes: int = 2 * GiB
    mooncake_protocol: str | None = None
    embedding_device: str = ""
    # vLLM's OpenAI-server flags for tool calls (its --reasoning-parser is an engine argument, passed through).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    log_level: str = "INFO"
    log_json: bool = False
    tls: TlsFiles = TlsFiles()
    tls_server_name: str | None = None
    health_port: int | None = None
    reflection: bool = True
    # Secrets, kept out of logs: the token callers must send, and the one sent to vision_svc.
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    vision_auth_token: str | None = dataclasses.field(default=None, repr=False)
    # What llm_svc picked for vLLM's CPU backend (None elsewhere); main applies its environment and logs it.
    cpu_defaults: CpuDefaults | None = None

    def __post_init__(self):
        if not self.vision:
            raise ValueError("--vision needs at least one HOST:PORT")
        check_targets(self.vision)
        if self.max_images_per_request < 1:
            raise ValueError("--max-images-per-request must be at least 1")
        if min(self.vision_timeout_s, self.vision_start_timeout_s, self.grace_s) < 0:
            raise ValueError("timeouts must be >= 0")
        for name in ("max_message_bytes", "max_embedding_bytes", "max_requests_in_flight", "max_bytes_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_bytes_in_flight < self.max_message_bytes + self.max_embedding_bytes:
            # Else the largest request could never be admitted, and would get RESOURCE_EXHAUSTED forever.
            raise ValueError(f"--max-bytes-in-flight ({self.max_bytes_in_flight}) is below what one request may hold, "
                             f"--max-message-bytes + --max-embedding-bytes ({self.max_message_bytes} + "
                             f"{self.max_embedding_bytes}); raise it or lower those")
        if self.embedding_transport not in TRANSPORT_CHOICES:
            raise ValueError(f"--embedding-transport must be one of {', '.join(TRANSPORT_CHOICES)}")
        if self.shm_max_bytes < 0:
            raise ValueError("--shm-max-bytes must be >= 0")
        if self.embedding_transport == "device_ipc" and not self.embedding_device:
            raise ValueError("--embedding-transport device_ipc needs --embedding-device")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")  # as vLLM's server
        check_server_settings(self.tls, self.port, self.health_port, self.metrics_port)
        check_client_settings(self.tls, self.tls_server_name)


# --log-level is vLLM's own flag; llm_svc's logs follow it too. The security fields come from pop_security_args.
_OWN_FLAGS = [f.name for f in dataclasses.fields(LlmConfig)
              if f.name not in ("log_level", "cpu_defaults", "tls", "tls_server_name", "health_port", "reflection",
                                "auth_token", "vision_auth_token")]


def build_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(
        prog="python -m llm_svc",
        description="The InternVL language stage: vLLM's engine behind gRPC (internvl.llm.v1.LanguageModel, "
                    "with grpc.health.v1 and reflection), fed image embeddings by vision_svc. Every vLLM "
                    "engine argument below is accepted unchanged.")
    d = LlmConfig(vision=("x:1",))
    own = parser.add_argument_group("llm_svc")
    own.add_argument("--vision", required=True,
                     help="vision_svc replicas, comma-separated: HOST:PORT, dns:///HOST:PORT or ipv4:IP:PORT. Every "
                          "address a name resolves to (a headless Service: one per ready pod) is a replica; names "
                          "are resolved again every 30 s and after a failure. Images go to the replica their "
                          "content hash ranks first (rendezvous hashing: its cache holds them), and are retried "
                          "once on the next when it is down or full")
    own.add_argument("--host", default=d.host, help="address to listen on")
    own.add_argument("--port", type=int, default=d.port, help="gRPC port (0 picks a free one)")
    own.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics (ours and the engine's) on this HTTP port")
    own.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request,
                     help="most images in one request")
    own.add_argument("--vision-timeout-s", type=float, default=d.vision_timeout_s,
                     help="deadline of one vision_svc call")
    own.add_argument("--vision-start-timeout-s", type=float, default=d.vision_start_timeout_s,
                     help="how long to wait at start for a vision_svc replica to answer GetInfo")
    own.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                     help="gRPC message limit; a Generate request carries all its images, so it bounds their sum")
    own.add_argument("--max-embedding-bytes", type=int, default=d.max_embedding_bytes,
                     help="largest embedding tensor accepted from vision_svc for one image")
    own.add_argument("--max-requests-in-flight", type=int, default=d.max_requests_in_flight,
                     help="most Generate requests served at once, streams included; beyond it a request gets "
                          "RESOURCE_EXHAUSTED at once, with a retry-after-s hint (the gateway tries another replica, "
                          "then answers 429)")
    own.add_argument("--max-bytes-in-flight", type=int, default=d.max_bytes_in_flight,
                     help="most bytes held at once by the requests being served: their messages (images included) "
                          "and the embeddings received for them, each counted when its header arrives; a request "
                          "that would pass it gets RESOURCE_EXHAUSTED with a retry-after-s hint, and a Generate "
                          "message is taken only while it leaves room for the most embeddings one request may hold. "
                          "At least --max-message-bytes + --max-embedding-bytes, and at start at least what a "
                          "request of the most images may hold with the vision stage's tiling")
    own.add_argument("--grace-s", type=float, default=d.grace_s,
                     help="on SIGTERM, seconds that in-flight streams get to finish before the engine stops")
    own.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    own.add_argument("--embedding-transport", choices=TRANSPORT_CHOICES, default=d.embedding_transport,
                     help="how embedding bytes come from vision_svc: auto takes, per replica, the best both accept "
                          "(shm when on one host, proven by a probe; then mooncake when --mooncake-protocol is set; "
                          "then socket; then grpc, inline in the stream; device_ipc first when --embedding-device "
                          "is set); a name forces one (a replica that cannot use it fails the call)")
    own.add_argument("--shm-dir", default=d.shm_dir,
                     help="shared-memory directory (tmpfs) for the shm transport; vision_svc must see the same one")
    own.add_argument("--shm-max-bytes", type=int, default=d.shm_max_bytes,
                     help="most bytes of shared-memory slots (one per image in flight, each the largest embedding "
                          "of one image); calls beyond it go inline. A slot's memory is taken when it is made and "
                          "kept for reuse")
    own.add_argument("--embedding-device", default=d.embedding_device,
                     help="a device (cuda:0, npu:0) to receive embeddings on with the device_ipc transport: a "
                          "vision_svc on this host that holds its embeddings on a device of the same kind exports "
                          "them as IPC handles, copied from device to device; unset, device_ipc is not offered")
    own.add_argument("--mooncake-protocol", choices=("tcp", "rdma"), default=None,
                     help="offer the mooncake transport (Mooncake Transfer Engine, when its package is installed) "
                          "with this protocol; --embedding-transport mooncake alone uses tcp")
    own.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="as vLLM's server: let the model decide to call tools (tool_choice auto); needs "
                          "--tool-call-parser")
    own.add_argument("--tool-call-parser", default=None,
                     help="as vLLM's server: the vLLM tool parser that reads tool calls from the output (hermes for "
                          "InternVL3.5's Qwen3 format); tool_choice required or a named function then force the "
                          "call's JSON through structured outputs")
    add_security_flags(parser.add_argument_group("llm_svc security"), serves_grpc=True, peer="vision")
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def given_options(argv: list[str] | None) -> set[str]:
    """The dests of the options that `argv` sets, however spelled (`--flag v`, `--flag=v`, `--flag_name v`,
    `--no-flag`, vLLM's `-O1` and `-cc.mode=...`): parsed again by a parser that has no defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def parse_config(argv: list[str] | None = None) -> tuple[LlmConfig, AsyncEngineArgs]:
    parser = build_parser()
    args = parser.parse_args(argv)
    own = {name: getattr(args, name) for name in _OWN_FLAGS}
    own["log_level"] = (getattr(args, "log_level", None) or "INFO").upper()
    own["vision"] = tuple(t.strip() for t in own["vision"].split(",") if t.strip())
    try:
        config = LlmConfig(**own, **pop_security_args(args, peer="vision"))
    except ValueError as error:
        parser.error(str(error))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    if engine_args.limit_mm_per_prompt and engine_args.limit_mm_per_prompt != NO_VISION_TOWER:
        parser.error("--limit-mm-per-prompt is set by llm_svc: images arrive as embeddings from vision_svc")
    engine_args.enable_mm_embeds = True
    engine_args.limit_mm_per_prompt = dict(NO_VISION_TOWER)
    if current_platform.is_cpu():
        try:
            defaults = pick_cpu_defaults(engine_args, given_options(argv), read_cpu_machine())
        except ValueError as error:
            parser.error(str(error))
        for name, value in defaults.engine_args.items():
            setattr(engine_args, name, value)
        config = dataclasses.replace(config, cpu_defaults=defaults)
    return config, engine_args

"""A GrpcServer with a scripted VisionEncoder, for testing the shared bootstrap in a real process.

Run as `python tests/protos/fake_vision_server.py PORT_FILE`: writes the bound port, serves until SIGTERM.
"""

import asyncio
import pathlib
import sys

from protos import errors, vision_pb2, vision_pb2_grpc
from protos.server import GrpcServer, wait_for_shutdown_signal

SERVICE = "internvl.vision.v1.VisionEncoder"


class ScriptedVision(vision_pb2_grpc.VisionEncoderServicer):
    """request_id picks the behaviour: 'slow' streams 5 chunks 0.2 s apart, 'bad' / 'crash' fail."""

    async def GetInfo(self, request, context):
        return vision_pb2.GetInfoResponse(model="fake", llm_hidden=8)

    async def Encode(self, request, context):
        if request.request_id == "bad":
            raise errors.InvalidInput("image 1: too big (limit 10)", metadata=(("missing", "1"),))
        for i in range(5 if request.request_id == "slow" else 2):
            if request.request_id == "crash" and i == 1:
                raise RuntimeError("boom")
            yield vision_pb2.EncodeResponse(image_index=0, data=b"x", last=i == 4)
            if request.request_id == "slow":
                await asyncio.sleep(0.2)


def make_server(port: int = 0, grace_s: float = 5.0, **security) -> GrpcServer:
    """`security`: GrpcServer's keyword arguments (tls, auth_token, reflection, health_port)."""
    server = GrpcServer("127.0.0.1", port, max_message_bytes=8 << 20, grace_s=grace_s, **security)
    server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, ScriptedVision(), SERVICE)
    return server


async def main(port_file: pathlib.Path) -> None:
    server = make_server()
    port = await server.start()
    await server.set_serving()
    port_file.write_text(str(port))
    await wait_for_shutdown_signal()
    await server.drain()


if __name__ == "__main__":
    asyncio.run(main(pathlib.Path(sys.argv[1])))

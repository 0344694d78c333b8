"""`python -m bench.grpc_echo grpc|http PORT RESPONSE_FILE`: the transports' ceilings for `bench grpc`.

`grpc`: a grpc.aio server (the same library, options and event loop, uvloop, as hydra-serve's gRPC)
that answers every `inference.GRPCInferenceService/ModelInfer` call with the same pre-serialized
response (a real answer of hydra-serve, captured in the same run) without looking at the request:
what h2load and this machine push through a Python gRPC server that does no work.

`http`: the same for V2 over HTTP: uvicorn (httptools, uvloop) and a FastAPI route, as hydra-serve
runs, reading the body and answering the captured V2 JSON answer bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the annotations


async def _serve(port: int, response: bytes) -> None:
    async def infer(request: bytes, context: Any) -> bytes:
        return response

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1 << 24)])
    handler = grpc.unary_unary_rpc_method_handler(infer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _serve_http(port: int, response: bytes) -> None:
    import uvicorn

    app = FastAPI()

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        await request.body()
        return Response(response, media_type="application/json")

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print("ready", flush=True)  # wrk retries connecting for the warm-up's first second
    server.run()


def main() -> None:
    import uvloop

    kind, port, response = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).read_bytes()
    if kind == "http":
        _serve_http(port, response)
    else:
        uvloop.run(_serve(port, response))


if __name__ == "__main__":
    main()

"""`python -m bench.ceilings asgi|fastapi PORT RESPONSE_FILE`: the HTTP framework ceilings of `bench server`.

Two servers that do what a V2 JSON `infer` request needs of the web stack and nothing else, on the
same uvicorn as ours (httptools parser, uvloop, access log off):

- `asgi`: a bare ASGI app: read the body, parse it with orjson, answer the fixed V2 JSON bytes.
- `fastapi`: the same as a FastAPI route (`POST /v2/models/{model_name}/infer`, `request: Request`).

RESPONSE_FILE holds the answer: a real answer of our server to the same request, captured in the
same run, so every server writes the same bytes. What our server reaches divided by what these reach
is the share of the framework's floor its own work leaves (issue 13).
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the annotations
from starlette.types import Message, Receive, Scope, Send

JSON_HEADERS = [(b"content-type", b"application/json")]


def bare_asgi_app(response: bytes) -> object:
    headers = [*JSON_HEADERS, (b"content-length", str(len(response)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["method"] != "POST":  # the readiness probe of bench.servers
            await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
            await send({"type": "http.response.body", "body": b'{"ready": true}'})
            return
        chunks = []
        more = True
        while more:
            message: Message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        orjson.loads(b"".join(chunks))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": response})

    return app


def fastapi_app(response: bytes) -> FastAPI:
    app = FastAPI()

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(response, media_type="application/json")

    @app.get("/v2/models/{model_name}/ready")
    async def ready(model_name: str) -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> None:
    import uvicorn

    kind, port, response = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).read_bytes()
    app = bare_asgi_app(response) if kind == "asgi" else fastapi_app(response)
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
    )


if __name__ == "__main__":
    main()

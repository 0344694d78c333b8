"""`python -m bench.ceilings asgi|fastapi PORT ROWS=ANSWER...`: the web stack's ceilings (`bench server`).

Two servers that do what a V2 JSON `infer` request needs of the web stack and nothing else, on the
same uvicorn as ours (httptools parser, uvloop, access log off):

- `asgi`: a bare ASGI app: read the body, parse it with orjson, answer fixed V2 JSON bytes.
- `fastapi`: the same as a FastAPI route (`POST /v2/models/{model_name}/infer`, `request: Request`).

Each ANSWER file holds the answer to a request of ROWS rows (the first input's `shape[0]`): a real
answer of our server to the same request, captured in the same run, so both write the same bytes.
What our server reaches divided by what these reach is the share of the framework's floor its own
work leaves (issue 13).
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from fastapi import FastAPI, Request, Response  # module level: FastAPI resolves the annotations
from starlette.types import Message, Receive, Scope, Send

JSON_HEADERS = [(b"content-type", b"application/json")]


def _answer(answers: dict[int, bytes], request: bytes) -> bytes:
    return answers[orjson.loads(request)["inputs"][0]["shape"][0]]


def bare_asgi_app(answers: dict[int, bytes]) -> object:
    lengths = {rows: str(len(body)).encode() for rows, body in answers.items()}

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
        document = orjson.loads(b"".join(chunks))
        rows = document["inputs"][0]["shape"][0]
        headers = [*JSON_HEADERS, (b"content-length", lengths[rows])]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answers[rows]})

    return app


def fastapi_app(answers: dict[int, bytes]) -> FastAPI:
    app = FastAPI()

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, request: Request) -> Response:
        return Response(_answer(answers, await request.body()), media_type="application/json")

    @app.get("/v2/models/{model_name}/ready")
    async def ready(model_name: str) -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> None:
    import uvicorn

    kind, port = sys.argv[1], int(sys.argv[2])
    answers = {
        int(rows): Path(path).read_bytes() for rows, _, path in (a.partition("=") for a in sys.argv[3:])
    }
    app = bare_asgi_app(answers) if kind == "asgi" else fastapi_app(answers)
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

"""The JSON response class every route uses: orjson, with numpy arrays and scalars serialised natively."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class OrjsonResponse(JSONResponse):
    """`application/json` by orjson; numpy float32 prints float32-short (0.1, not 0.10000000149)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=ORJSON_OPTIONS)

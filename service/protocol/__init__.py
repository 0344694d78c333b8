"""Wire protocols spoken by the server. `v2`: the Open Inference Protocol (KServe V2 / Triton HTTP)
codec — import from `service.protocol.v2`."""

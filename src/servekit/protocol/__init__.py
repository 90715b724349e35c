"""servekit.protocol: the wire formats every front end, client and gateway shares.

OpenAI's request bodies (:mod:`~servekit.protocol.schema`, pydantic), OpenAI-shaped errors
(:mod:`~servekit.protocol.errors`), server-sent-event framing (:mod:`~servekit.protocol.sse`)
and the generated gRPC code (``servekit.protocol.grpc_gen``, from ``servekit.proto``). A leaf:
it imports nothing else of servekit but :mod:`servekit.errors`, and never torch.
"""

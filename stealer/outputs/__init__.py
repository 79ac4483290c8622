"""Where a gateway's released results go besides ``--out``: :mod:`.mqtt` (``--mqtt``).

Each output is fed from the gateway's result release (``GatewayShell._emit_result``) with the
same result dict that ``--out`` writes as a JSON line, and must never block the event loop.
"""

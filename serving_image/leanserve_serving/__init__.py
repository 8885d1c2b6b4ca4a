"""What runs inside the serving pods: model server, batching sidecar, caches, the fetch init step, bench.

It imports nothing from the operator side, so the serving image stays small;
the operator imports its Profile model (pydantic only).
"""

__version__ = "0.1.0"

"""What runs inside the serving pods: model server, batching sidecar, cache, bench.

Only the package exists so far; the serving issue fills it. It imports nothing
from the operator side, so the serving image stays small.
"""

__version__ = "0.1.0"

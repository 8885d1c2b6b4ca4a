"""leanserve: cost-aware model serving on Kubernetes.

The operator side (``leanserve.api``, and later the planner, builders and the
kopf handlers) lives in this package; what runs inside serving pods lives in
``leanserve_serving`` under ``serving_image/``.
"""

__version__ = "0.1.0"

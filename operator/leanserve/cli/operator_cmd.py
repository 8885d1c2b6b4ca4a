"""``leanserve operator``: run the operator (kopf) against the current kubeconfig or in-cluster.

Cluster-wide by default; ``--namespace`` (repeatable) limits it to some
namespaces. Standalone: one operator per cluster (the chart runs one replica).
"""

from __future__ import annotations

import argparse
import logging

#: kopf's liveness endpoint unless --liveness says otherwise (the chart's probes ask it).
LIVENESS = "http://0.0.0.0:8080/healthz"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the operator: reconcile InferenceDeployments into serving deployments")
    p.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable)")
    p.add_argument(
        "--liveness", default=LIVENESS, help="kopf's liveness endpoint (default: %(default)s; 'off' for none)"
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    from leanserve.controller import handlers  # registers the handlers

    handlers.CONNECTION_LIMIT += 2 * len(args.namespace)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    for noisy in ("kubernetes", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=None if args.liveness == "off" else args.liveness,
    )
    return 0

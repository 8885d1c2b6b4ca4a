"""An in-cluster HTTP load client for the end-to-end tests (runs in a pod of the serving image).

Sends v2 inference requests to a URL for a fixed time, either as fast as ``--concurrency``
connections allow (closed loop) or at ``--rate`` requests per second (open loop). Each request
carries random features unless ``--repeat``, so the response cache does not answer the load.
Every request has a timeout: one that hangs counts as failed. Prints progress, then one JSON
line with the counts, status codes, errors and latency percentiles.

Only the standard library and aiohttp (both in the serving image).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import aiohttp


def body(input_name: str, features: int, repeat: bool, rng: random.Random) -> bytes:
    data = [0.5] * features if repeat else [rng.uniform(-2, 2) for _ in range(features)]
    return json.dumps(
        {"inputs": [{"name": input_name, "shape": [1, features], "datatype": "FP32", "data": data}]}
    ).encode()


async def main(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    skipped = 0
    start = time.monotonic()
    end = start + args.duration
    headers = {"content-type": "application/json"}

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            t0 = time.monotonic()
            try:
                async with session.post(
                    args.url, data=body(args.input, args.features, args.repeat, rng), headers=headers
                ) as reply:
                    await reply.read()
                    statuses[str(reply.status)] += 1
                    if reply.status == 200:
                        latencies.append((time.monotonic() - t0) * 1000)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

        async def worker() -> None:
            while time.monotonic() < end:
                await one()

        async def progress() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(5)
                done = sum(statuses.values()) + sum(errors.values())
                print(
                    f"progress t={time.monotonic() - start:.0f}s sent={done} statuses={dict(statuses)} "
                    f"errors={sum(errors.values())}",
                    flush=True,
                )

        reporter = asyncio.create_task(progress())
        if args.rate:
            # Open loop, with at most --concurrency requests in flight: an arrival that finds them
            # all busy is skipped (counted), so an unreachable rate saturates the server with a
            # bounded queue instead of opening connections without end.
            pending: set[asyncio.Task[None]] = set()
            interval = 1 / args.rate
            next_at = time.monotonic()
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
                if len(pending) >= args.concurrency:
                    skipped += 1
                    continue
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending)
        else:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        reporter.cancel()

    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2) if latencies else None

    sent = sum(statuses.values()) + sum(errors.values())
    return {
        "sent": sent,
        "ok": statuses.get("200", 0),
        "failed": sent - statuses.get("200", 0),
        "statuses": dict(statuses),
        "errors": dict(errors.most_common(5)),
        "rps": round(sent / elapsed, 1),
        "skipped": skipped,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "duration_s": round(elapsed, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--input", required=True, help="the model's input name")
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=4, help="connections (closed loop), most in flight (open)")
    parser.add_argument("--rate", type=float, default=0, help="open loop at this many requests/s (0: closed loop)")
    parser.add_argument("--timeout", type=float, default=10)
    parser.add_argument("--repeat", action="store_true", help="the same body every time")
    parser.add_argument("--seed", type=int, default=0)
    result = asyncio.run(main(parser.parse_args()))
    print("RESULT " + json.dumps(result), flush=True)

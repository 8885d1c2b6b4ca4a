"""leanserve bench: profile precision variants of a model (quality, latency, memory) on this hardware."""

"""What every peer driver reports: tokens/s over the steps after warm-up (``stamps``: the
wall clock at each step's end), or, for ``whole_epoch``, over one epoch end to end."""


def throughput(spec: dict, stamps: dict, wall: float, steps: int, warmup: int, batch_size: int) -> dict:
    if spec.get("whole_epoch"):
        seconds, tokens = wall, spec["total_tokens"]
    else:
        seconds = stamps[steps + warmup] - stamps[warmup]
        tokens = steps * batch_size * spec["tokens_per_pair"]
    return {"tokens_per_second": tokens / seconds, "seconds": seconds}

"""Memory and time probes: a process's peak RSS (reset before the measured part), CPU seconds, and
times read from a fine-tuning log."""
from __future__ import annotations

import sys


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def peak_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = usage / 2**20 if sys.platform == "darwin" else usage / 1024  # bytes on macOS, KiB on Linux
    return peak


def time_to_fraction(log: list[dict], final: float | None, fraction: float = 0.95) -> float | None:
    """Seconds until the held-out Dice estimate first reached ``fraction`` of its final value."""
    if not final or final <= 0:
        return None
    for record in log:
        value = record.get("heldout_dice")
        if value is not None and value >= fraction * final:
            return float(record["elapsed_s"])
    return None


def heldout_curve(log: list[dict]) -> list[list[float]]:
    """[(elapsed s, held-out Dice)] at each change of the estimate (it is refreshed a few times)."""
    curve, last = [], None
    for record in log:
        value = record.get("heldout_dice")
        if value is not None and value != last:
            curve.append([float(record["elapsed_s"]), round(float(value), 4)])
            last = value
    return curve


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every finished child process."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))

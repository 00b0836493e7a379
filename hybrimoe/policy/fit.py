"""Fitting a cost profile to measurements (used by hybrimoe.calibrate; pure Python). Residuals are
relative, (measured - predicted) / measured, so 1-token and 128-token samples weigh alike."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class RooflineFit:
    """t(n) = max(flat, slope * n) + intercept, in seconds (n = tokens)."""

    flat: float  # s: memory-bound time (bytes / bandwidth)
    slope: float  # s per token: compute time (flops per token / FLOP rate)
    intercept: float  # s: fixed overhead
    note: str = ""  # what the data could not pin down

    def predict(self, tokens: float) -> float:
        return max(self.flat, self.slope * tokens) + self.intercept


def _weighted_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) minimising sum(((y - intercept - slope*x) / y)^2)."""
    w = [1.0 / (y * y) for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * sxx - sx * sx
    if det <= 0:
        return 0.0, sy / sx if sx else 0.0
    slope = (sw * sxy - sx * sy) / det
    return (sy - slope * sx) / sw, slope


def _rel_sse(fit: RooflineFit, xs: list[float], ys: list[float]) -> float:
    return sum(((y - fit.predict(x)) / y) ** 2 for x, y in zip(xs, ys))


def fit_roofline(tokens: list[int], seconds: list[float]) -> RooflineFit:
    """Least-squares roofline through (tokens, seconds): every split of the sorted samples into a
    flat (memory-bound) head and a linear (compute-bound) tail is fitted; the best one is kept."""
    assert tokens and len(tokens) == len(seconds) and min(seconds) > 0, (tokens, seconds)
    pairs = sorted(zip(tokens, seconds))
    xs, ys = [float(p[0]) for p in pairs], [float(p[1]) for p in pairs]
    level = sum(1 / y for y in ys) / sum(1 / (y * y) for y in ys)  # weighted mean of all samples
    best = RooflineFit(level, level / xs[-1], 0.0, "(compute-bound region not reached: FLOP rate is a lower bound)")
    best_err = _rel_sse(best, xs, ys)
    for head in range(0, len(xs) - 1):  # samples [0, head) flat, [head, n) on the line
        tail_x, tail_y = xs[head:], ys[head:]
        if len(set(tail_x)) < 2:
            continue
        intercept, slope = _weighted_line(tail_x, tail_y)
        if slope <= 0:
            continue
        if intercept < 0:  # no negative overheads: refit the line through the origin
            intercept = 0.0
            slope = sum(1 / y for y in tail_y) / sum(x / (y * y) for x, y in zip(tail_x, tail_y))
        if head:
            head_y = ys[:head]
            flat = sum(1 / y for y in head_y) / sum(1 / (y * y) for y in head_y) - intercept
            note = ""
        else:
            flat, note = slope * xs[0], "(memory-bound region not reached: bandwidth is a lower bound)"
        fit = RooflineFit(max(flat, 1e-12), slope, intercept, note)
        err = _rel_sse(fit, xs, ys)
        if err < best_err:
            best, best_err = fit, err
    return best


def fit_roofline_two_sizes(tokens: list[int], seconds: list[float], flops_per_token: float, expert_bytes: float,
                           small_bytes: float, small_t1: float) -> RooflineFit | None:
    """Roofline whose memory part and fixed overhead are told apart by a second, smaller expert.

    With one expert size, t(1) = bytes/bandwidth + overhead cannot be split: any bandwidth fits with
    a matching overhead, so the fitted bandwidth does not carry over to other shapes. The single-token
    times of two sizes give the split (t1 = overhead + bytes * s/B, least squares through both);
    the per-token compute time then comes from the samples that are compute-bound (slower than
    1.5 x the single-token time) by relative least squares of t = overhead + slope * n. None when the
    samples do not allow it (no single-token sample, or the larger expert is not slower).
    """
    if 1 not in tokens or expert_bytes <= small_bytes:
        return None
    t1 = seconds[tokens.index(1)]
    per_byte = (t1 - small_t1) / (expert_bytes - small_bytes)  # s/B
    if per_byte <= 0:
        return None
    overhead = max(0.0, t1 - expert_bytes * per_byte)
    flat = t1 - overhead  # s: memory-bound time of the measured expert
    bound = [(n, t) for n, t in zip(tokens, seconds) if t > 1.5 * t1]
    if bound:
        # relative least squares of t = overhead + slope * n over the compute-bound samples
        slope = sum(n * (t - overhead) / t**2 for n, t in bound) / sum(n * n / t**2 for n, t in bound)
        note = ""
    else:
        n, t = max(zip(tokens, seconds))
        slope, note = (t - overhead) / n, "(compute-bound region not reached: FLOP rate is a lower bound)"
    return RooflineFit(flat, max(slope, 1e-15), overhead, note)


def fit_affine(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept >= 0, slope > 0) of y = intercept + slope*x by relative least squares."""
    intercept, slope = _weighted_line([float(x) for x in xs], [float(y) for y in ys])
    if intercept < 0 or slope <= 0:
        intercept, slope = 0.0, sum(1 / y for y in ys) / sum(x / (y * y) for x, y in zip(xs, ys))
    return intercept, slope


def fit_penalty(predicted: list[float], measured: list[float]) -> float:
    """Factor k >= 1 minimising sum(((measured - k*predicted) / predicted)^2) = mean(measured/predicted)."""
    return max(1.0, sum(m / p for m, p in zip(measured, predicted)) / len(predicted))

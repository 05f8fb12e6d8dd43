"""Non-regression budgets: how much worse than the file before it a candidate may be.

The one home of the budgets (docs/releasing.md shows them): per metric, which way is better and
how far the candidate may move from the previous file measured beside it in the same run, as a
factor of the previous value or a delta from it. Pull requests compare small random-weight
conversions on shared CI runners, so their bounds are looser than a release's. Standard library
only: the publishing job checks a report with it.
"""

from __future__ import annotations

from dataclasses import dataclass

PULL_REQUEST = "pull-request"
RELEASE = "release"
KINDS = (PULL_REQUEST, RELEASE)
LOWER, HIGHER = "lower", "higher"  # which direction is better
FACTOR, DELTA = "factor", "delta"


@dataclass(frozen=True)
class Budget:
    """One metric's budget; a bound of None records the metric without gating it."""

    metric: str
    label: str
    unit: str
    better: str
    kind: str
    pull_request: float | None
    release: float | None

    def bound(self, kind: str) -> float | None:
        if kind not in KINDS:
            raise ValueError(f"unknown budget kind {kind!r}; one of {', '.join(KINDS)}")
        return self.pull_request if kind == PULL_REQUEST else self.release

    def limit(self, kind: str, previous: float) -> float | None:
        """The worst candidate value the budget allows, given the previous file's."""
        bound = self.bound(kind)
        if bound is None:
            return None
        if self.kind == FACTOR:
            return previous * bound if self.better == LOWER else previous / bound
        return previous + bound if self.better == LOWER else previous - bound

    def breached(self, kind: str, candidate: float, previous: float) -> bool:
        limit = self.limit(kind, previous)
        if limit is None:
            return False
        return candidate > limit if self.better == LOWER else candidate < limit

    def describe(self, kind: str) -> str:
        """The budget in words: `≤ 1.05× previous`, `≥ previous − 0.5 dB`, `not gated`."""
        bound = self.bound(kind)
        if bound is None:
            return "not gated"
        sign = "≤" if self.better == LOWER else "≥"
        if self.kind == FACTOR:
            factor = bound if self.better == LOWER else 1 / bound
            return f"{sign} {factor:g}× previous"
        op = "+" if self.better == LOWER else "−"
        return f"{sign} previous {op} {bound:g} {self.unit}"


# Latency bounds leave room for run-to-run noise: two identical full-size htdemucs files, run
# alternately on a loaded 2-core machine, came out up to 1.09x apart (docs/releasing.md).
BUDGETS: tuple[Budget, ...] = (
    # The validation gate's margin (worst stem and input, OpenKara's setting) against the float64
    # reference recorded at conversion: a corrupted weight costs tens of dB.
    Budget("gate_margin_db", "gate margin, worst stem", "dB", HIGHER, DELTA, 1.0, 0.5),
    Budget(
        "latency_app_s", "s / segment, OpenKara (optimization off)", "s", LOWER, FACTOR, 1.20, 1.10
    ),
    Budget("latency_default_s", "s / segment, default options", "s", LOWER, FACTOR, 1.20, 1.10),
    Budget("session_load_s", "session load, optimization off", "s", LOWER, FACTOR, 1.30, 1.15),
    Budget(
        "peak_rss_mb",
        "peak RSS, load + 2 segments, optimization off",
        "MB",
        LOWER,
        FACTOR,
        1.10,
        1.05,
    ),
    Budget("file_bytes", "file size", "bytes", LOWER, FACTOR, 1.02, 1.01),
    # The share of the nodes ORT's checker places on CoreML as the app configures it (percentage
    # points): a drop means more partitions and more of the work on the CPU on Apple Silicon.
    Budget(
        "accelerator_share",
        "nodes on CoreML (ORT's checker, `invoke ep-report --static`)",
        "%",
        HIGHER,
        DELTA,
        2.0,
        1.0,
    ),
)
BY_METRIC = {b.metric: b for b in BUDGETS}


def get(metric: str) -> Budget:
    """The budget of `metric`; ValueError naming the known metrics otherwise."""
    if metric not in BY_METRIC:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(BY_METRIC)}")
    return BY_METRIC[metric]

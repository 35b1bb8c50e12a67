"""Prometheus text exposition (format 0.0.4), written by hand: a handful of series need no client library.

Gauges and engine counters are read from `engine.stats()` at scrape time; latency histograms are observed by
the HTTP layer, which sees each request from arrival to its last token.
"""

import bisect
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; the upper ends cover a long prompt waiting behind a full batch on a CPU.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, float("inf")), counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]
        return lines


def _scalar(kind: str, name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


class Metrics:
    def __init__(self):
        self.ttft = Histogram("exaserve_time_to_first_token_seconds",
                              "Time from the request's arrival to its first output token.", _LATENCY_BUCKETS)
        self.tpot = Histogram("exaserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request.", _PER_TOKEN_BUCKETS)
        self.e2e = Histogram("exaserve_e2e_request_latency_seconds",
                             "Time from the request's arrival to its last token.", _LATENCY_BUCKETS)
        self.rejected = 0  # requests refused because the waiting queue was full

    def observe_request(self, arrival: float, first_token: float | None, finished: float, num_output_tokens: int):
        """One engine request that produced output; times from time.monotonic()."""
        self.e2e.observe(finished - arrival)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        if num_output_tokens > 1:
            self.tpot.observe((finished - first_token) / (num_output_tokens - 1))

    def render(self, stats: dict) -> str:
        def usage(used: str, total: str) -> float:
            return stats[used] / stats[total] if stats[total] else 0.0

        lines = [
            *_scalar("gauge", "exaserve_num_requests_running", "Requests in the running batch.", stats["running"]),
            *_scalar("gauge", "exaserve_num_requests_waiting", "Requests waiting to be scheduled.", stats["waiting"]),
            *_scalar("gauge", "exaserve_kv_blocks_usage_ratio",
                     "Fraction of the paged KV pool (global layers) in use.", usage("blocks_used", "blocks_total")),
            *_scalar("gauge", "exaserve_kv_blocks_used", "Paged KV blocks in use.", stats["blocks_used"]),
            *_scalar("gauge", "exaserve_kv_blocks_total", "Paged KV blocks in the pool.", stats["blocks_total"]),
            *_scalar("gauge", "exaserve_ring_slots_usage_ratio",
                     "Fraction of the sliding-window ring pool in use.", usage("ring_slots_used", "ring_slots_total")),
            *_scalar("gauge", "exaserve_ring_slots_used", "Sliding-window ring slots in use.",
                     stats["ring_slots_used"]),
            *_scalar("gauge", "exaserve_ring_slots_total", "Sliding-window ring slots in the pool.",
                     stats["ring_slots_total"]),
            *_scalar("counter", "exaserve_prompt_tokens_total", "Prompt tokens prefilled.", stats["prompt_tokens"]),
            *_scalar("counter", "exaserve_generation_tokens_total", "Output tokens generated.",
                     stats["generation_tokens"]),
            *_scalar("counter", "exaserve_requests_finished_total", "Requests that finished (stop or length).",
                     stats["finished"]),
            *_scalar("counter", "exaserve_request_aborts_total",
                     "Requests aborted before they finished (client gone).", stats["aborted"]),
            *_scalar("counter", "exaserve_preemptions_total", "Running requests preempted for KV memory.",
                     stats["preemptions"]),
            *_scalar("counter", "exaserve_prefix_cache_queries_total",
                     "Prompt tokens looked up in the prefix cache.", stats["prefix_cache_queries"]),
            *_scalar("counter", "exaserve_prefix_cache_hits_total",
                     "Prompt tokens found in the prefix cache (not computed).", stats["prefix_cache_hits"]),
            *_scalar("counter", "exaserve_requests_rejected_total", "Requests refused with 429 (queue full).",
                     self.rejected),
        ]
        if "acceptance_per_position" in stats:
            lines += [
                *_scalar("counter", "exaserve_spec_drafts_proposed_total", "MTP draft tokens verified.",
                         stats["drafts_proposed"]),
                *_scalar("counter", "exaserve_spec_drafts_accepted_total", "MTP draft tokens accepted.",
                         stats["drafts_accepted"]),
                *_scalar("gauge", "exaserve_spec_mean_emitted_tokens",
                         "Mean tokens emitted per verification (accepted drafts + 1).",
                         stats["mean_emitted_per_verify"]),
                *_scalar("counter", "exaserve_spec_disabled_steps_total",
                         "Steps without drafting because the batch was above --spec-max-batch-size.",
                         stats["spec_disabled_steps"]),
                "# HELP exaserve_spec_acceptance_rate Acceptance rate of the draft at each position.",
                "# TYPE exaserve_spec_acceptance_rate gauge",
                *(f'exaserve_spec_acceptance_rate{{position="{j + 1}"}} {_number(rate)}'
                  for j, rate in enumerate(stats["acceptance_per_position"])),
            ]
        for histogram in (self.ttft, self.tpot, self.e2e):
            lines += histogram.render()
        return "\n".join(lines) + "\n"

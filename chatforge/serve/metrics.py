"""Prometheus metrics in the text exposition format (written by hand: a few counters, one histogram).

    chatforge_requests_total{endpoint,status}     HTTP requests answered, by route and status
    chatforge_prompt_tokens_total                 prompt tokens of generation requests
    chatforge_completion_tokens_total             tokens generated (stop tokens and best_of extras included)
    chatforge_time_to_first_token_seconds         histogram: request received -> first token generated
    chatforge_request_duration_seconds            histogram: generation request received -> last token
    chatforge_queue_length                        requests waiting for a slot
    chatforge_running_requests                    requests generating now
    chatforge_running_sequences                   engine rows (KV-cache slots) in use
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {c}' for bound, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters; `render` adds the gauges read from `gauges` at scrape time."""

    def __init__(self, gauges: Callable[[], dict[str, float]] | None = None) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.gauges = gauges or (lambda: {})

    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_duration(self, seconds: float) -> None:
        with self._lock:
            self.duration.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP chatforge_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE chatforge_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'chatforge_requests_total{{endpoint="{_label(endpoint)}",status="{status}"}} {n}')
            lines += ["# HELP chatforge_prompt_tokens_total Prompt tokens of generation requests.",
                      "# TYPE chatforge_prompt_tokens_total counter",
                      f"chatforge_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP chatforge_completion_tokens_total Tokens generated.",
                      "# TYPE chatforge_completion_tokens_total counter",
                      f"chatforge_completion_tokens_total {self.completion_tokens}",
                      "# HELP chatforge_time_to_first_token_seconds From request to first generated token.",
                      "# TYPE chatforge_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("chatforge_time_to_first_token_seconds")
            lines += ["# HELP chatforge_request_duration_seconds From request to last generated token.",
                      "# TYPE chatforge_request_duration_seconds histogram"]
            lines += self.duration.lines("chatforge_request_duration_seconds")
        helps = {"queue_length": "Requests waiting for a slot.",
                 "running_requests": "Requests generating now.",
                 "running_sequences": "Engine rows (KV-cache slots) in use."}
        for name, value in self.gauges().items():
            lines += [f"# HELP chatforge_{name} {helps.get(name, name)}", f"# TYPE chatforge_{name} gauge",
                      f"chatforge_{name} {value:g}"]
        return "\n".join(lines) + "\n"

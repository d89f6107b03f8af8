"""Prometheus metrics of one server, in its own registry, named after vLLM's where vLLM has one.

`flowspec:` + vLLM's suffix (`vllm:num_requests_running` -> `flowspec:num_requests_running`, ...), so
dashboards built for vLLM find the request-level series. Pipeline series of our own: per-stage busy time and
the last answer's busy fraction, link bytes, stage up/down, recoveries. Every series carries `model_name`.
Link and stage series are read from the head's links when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowspec.node.head import GenerationResult, HeadNode

__all__ = ["CONTENT_TYPE", "Finished", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_ACCEPTED = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


@dataclass(frozen=True, slots=True)
class Finished:
    """One answered request, as the metrics see it."""

    mode: str
    prompt_tokens: int
    finish_reason: str  # stop, length, abort (the client went away), error
    e2e_s: float
    token_gaps: Sequence[tuple[float, int]]  # (seconds since the previous tokens, tokens that came)
    result: GenerationResult


class ServeMetrics:
    def __init__(self, head: HeadNode, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model, self.head = model, head
        r, m = self.registry, ["model_name"]
        # the head's own counts, as vLLM's are its engine's: a request is running or waiting, never both
        Gauge("flowspec:num_requests_running", "Requests being generated now", m, registry=r) \
            .labels(model).set_function(lambda: float(head.running))
        Gauge("flowspec:num_requests_waiting", "Requests admitted by the server, waiting for the head", m,
              registry=r).labels(model).set_function(lambda: float(head.waiting))
        self.success = Counter("flowspec:request_success", "Finished requests by finish reason (stop, length, "
                               "abort: the client went away, error)", [*m, "finished_reason"], registry=r)
        self.rejected = Counter("flowspec:request_rejected", "Requests refused before generation, by HTTP status",
                                [*m, "status"], registry=r)
        self.prompt_tokens = Counter("flowspec:prompt_tokens", "Prefilled prompt tokens", m, registry=r)
        self.generation_tokens = Counter("flowspec:generation_tokens", "Generated tokens", m, registry=r)
        self.request_prompt = Histogram("flowspec:request_prompt_tokens", "Prompt tokens per request", m,
                                        buckets=_TOKENS, registry=r)
        self.request_generation = Histogram("flowspec:request_generation_tokens", "Generated tokens per request",
                                            m, buckets=_TOKENS, registry=r)
        self.ttft = Histogram("flowspec:time_to_first_token_seconds", "Time to the first token", m,
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("flowspec:inter_token_latency_seconds", "Time per output token after the first "
                             "(tokens committed together share their gap)", m, buckets=_TOKEN_LATENCY, registry=r)
        self.e2e = Histogram("flowspec:e2e_request_latency_seconds", "Request latency, arrival to last token", m,
                             buckets=_LATENCY, registry=r)
        self.drafts = Counter("flowspec:spec_decode_num_drafts", "Verifications (a returned segment that "
                              "committed tokens), speculative modes", m, registry=r)
        self.draft_tokens = Counter("flowspec:spec_decode_num_draft_tokens", "Draft tree nodes sent through "
                                    "the pipeline for verification", m, registry=r)
        self.accepted_tokens = Counter("flowspec:spec_decode_num_accepted_tokens", "Drafted tokens accepted "
                                       "(tokens committed beyond one per verification)", m, registry=r)
        self.accepted_length = Histogram("flowspec:spec_decode_accepted_length", "Tokens committed per "
                                         "verification (its mean is the mean accepted length)", [*m, "mode"],
                                         buckets=_ACCEPTED, registry=r)
        self.stage_busy = Counter("flowspec:stage_busy_seconds", "Seconds each stage computed for requests "
                                  "(rate() is its busy fraction)", [*m, "stage"], registry=r)
        self.busy_fraction = Gauge("flowspec:stage_busy_fraction", "Each stage's busy fraction over the decode "
                                   "phase of the last finished request", [*m, "stage"], registry=r)
        self.head_busy = Counter("flowspec:head_busy_seconds", "Seconds the head computed (lm_head, drafting)", m,
                                 registry=r)
        self.registry.register(_LinkCollector(head, model))

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model, str(status)).inc()

    def record(self, done: Finished) -> None:
        model, result = self.model, done.result
        generated = len(result.tokens)
        self.success.labels(model, done.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.request_prompt.labels(model).observe(done.prompt_tokens)
        self.request_generation.labels(model).observe(generated)
        if generated:
            self.ttft.labels(model).observe(result.ttft_s)
        for gap, count in done.token_gaps:
            for _ in range(count):
                self.itl.labels(model).observe(gap / count)
        self.e2e.labels(model).observe(done.e2e_s)
        stats = result.stats
        if done.mode != "ar":
            self.drafts.labels(model).inc(stats.verifications)
            self.draft_tokens.labels(model).inc(stats.rows_sent)
            self.accepted_tokens.labels(model).inc(max(0, stats.committed - stats.verifications))
        for n in stats.accepted_per_verification:
            self.accepted_length.labels(model, done.mode).observe(n)
        for stage, intervals in result.busy.items():
            self.stage_busy.labels(model, str(stage)).inc(sum(end - start for start, end, _ in intervals))
        if result.busy:
            for k, fraction in enumerate(result.utilization(self.head.num_stages), start=1):
                self.busy_fraction.labels(model, str(k)).set(fraction)
        self.head_busy.labels(model).inc(result.head_busy_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LinkCollector(Collector):
    """Read at scrape time from the head's links: stage up/down, bytes each way, recoveries."""

    def __init__(self, head: HeadNode, model: str) -> None:
        self.head, self.model = head, model

    def collect(self) -> Iterator[Metric]:
        links = self.head.links
        up = GaugeMetricFamily("flowspec:stage_up", "1 while the head's link to the stage is up",
                               labels=["model_name", "stage"])
        sent = CounterMetricFamily("flowspec:link_sent_bytes", "Bytes the head sent to each stage (since the "
                                   "link was last connected)", labels=["model_name", "stage"])
        received = CounterMetricFamily("flowspec:link_received_bytes", "Bytes the head received from each stage "
                                       "(since the link was last connected)", labels=["model_name", "stage"])
        for k in range(1, links.num_stages + 1):
            link = links.links[k - 1] if k <= len(links.links) else None
            labels = [self.model, str(k)]
            up.add_metric(labels, 1.0 if link is not None and link.error is None else 0.0)
            sent.add_metric(labels, float(link.bytes_sent if link is not None else 0))
            received.add_metric(labels, float(link.bytes_received if link is not None else 0))
        recoveries = CounterMetricFamily("flowspec:recoveries", "Lost stages the head brought back",
                                         labels=["model_name"])
        recoveries.add_metric([self.model], float(links.generation))
        yield from (up, sent, received, recoveries)

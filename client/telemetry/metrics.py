"""The daemon's metric instruments: one place that names them, so dashboards have a stable vocabulary."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from client.wire.messages import HeapStats, LoraCacheStats

# Renders take seconds to minutes (tiny at 64x64 on CPU: ~4 s/step; dev at 1024^2: tens of seconds).
RENDER_DURATION_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# RPC calls: from sub-millisecond pings to whole renders.
RPC_DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Thin, named wrappers over the instruments; every method is cheap and safe to call from any thread."""

    def __init__(self, meter: Meter) -> None:
        self.render_duration = meter.create_histogram(
            "easel.render.duration",
            unit="s",
            description="Wall time of one render, queue wait included",
            explicit_bucket_boundaries_advisory=list(RENDER_DURATION_BUCKETS_S),
        )
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of one daemon request, as the OpenTelemetry RPC conventions name it",
            explicit_bucket_boundaries_advisory=list(RPC_DURATION_BUCKETS_S),
        )
        self.queue_depth = meter.create_gauge("easel.queue.depth", unit="{job}", description="Jobs waiting")
        self.stack_switches = meter.create_counter(
            "easel.lora.stack.switches", unit="{switch}", description="LoRA stack changes on the live model"
        )
        self.preemptions = meter.create_counter(
            "easel.render.preemptions",
            unit="{preemption}",
            description="Batch renders suspended at a step boundary for an interactive one",
        )
        # LoRA cache: observed from the cache's own cumulative stats at each export (observe_lora_cache).
        self._cache_stats: Callable[[], LoraCacheStats] | None = None
        meter.create_observable_counter(
            "easel.lora.cache.hits", [self._observe("hits")], unit="{file}", description="LoRA cache hits"
        )
        meter.create_observable_counter(
            "easel.lora.cache.misses", [self._observe("misses")], unit="{file}", description="LoRA files read from disk"
        )
        meter.create_observable_gauge(
            "easel.lora.cache.size", [self._observe("bytes")], unit="By", description="Bytes held by the LoRA cache"
        )
        # Resident stacks (built stacks kept for instant switches): the same four figures, same type.
        self._resident_stats: Callable[[], LoraCacheStats] | None = None
        for name, field, unit, text in (
            ("hits", "hits", "{stack}", "Switches to a stack already built"),
            ("misses", "misses", "{stack}", "Stacks built from their files"),
            ("evictions", "evictions", "{stack}", "Built stacks dropped to stay within the bound"),
        ):
            meter.create_observable_counter(
                f"easel.lora.resident.{name}", [self._observe(field, resident=True)], unit=unit, description=text
            )
        meter.create_observable_gauge(
            "easel.lora.resident.size",
            [self._observe("bytes", resident=True)],
            unit="By",
            description="Bytes held by resident LoRA stacks",
        )
        # The process's malloc heap: bytes in use (what a leak grows) apart from freed bytes kept for reuse.
        self._heap_stats: Callable[[], HeapStats | None] | None = None
        for field, name, text in (
            ("in_use_bytes", "in_use", "Heap bytes in use by the daemon process (malloc)"),
            ("free_bytes", "free", "Heap bytes freed and kept for reuse, not returned to the system (malloc)"),
        ):
            meter.create_observable_gauge(
                f"easel.heap.{name}", [self._observe_heap(field)], unit="By", description=text
            )
        self.errors = meter.create_counter(
            "easel.errors", unit="{error}", description="Failed requests and renders, by error.type"
        )
        # A cluster gateway's own: renders sent again after their replica died, and what the cancels of
        # renders a replica had taken came to (easel.cancel.outcome: stopped, too_late, no_word).
        self.cluster_retries = meter.create_counter(
            "easel.cluster.retries", unit="{render}", description="Renders sent to another replica after theirs died"
        )
        self.cluster_cancels = meter.create_counter(
            "easel.cluster.cancels",
            unit="{cancel}",
            description="Cancels of renders a replica had taken, by what the replica said they came to",
        )

    def record_render(self, seconds: float, attributes: Mapping[str, Any] | None = None) -> None:
        self.render_duration.record(seconds, dict(attributes or {}))

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def preempted(self) -> None:
        self.preemptions.add(1)

    def stack_switched(self, count: int = 1) -> None:
        self.stack_switches.add(count)

    def observe_lora_cache(
        self, stats: Callable[[], LoraCacheStats], resident: Callable[[], LoraCacheStats] | None = None
    ) -> None:
        """Report the LoRA cache from `stats()` (cumulative `hits`, `misses`, `bytes`), and the resident
        stacks from `resident()`, e.g. `tel.metrics.observe_lora_cache(cache.stats, stacks.stats)`; read
        only when metrics are exported."""
        self._cache_stats = stats
        self._resident_stats = resident

    def _observe(self, field: str, resident: bool = False) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            source = self._resident_stats if resident else self._cache_stats
            if source is None:
                return []
            stats = source()
            return [Observation(int(getattr(stats, field)))]

        return callback

    def observe_heap(self, stats: Callable[[], HeapStats | None]) -> None:
        """Report the process's malloc heap from `stats()` (None where it cannot be read: nothing is
        reported then); read only when metrics are exported."""
        self._heap_stats = stats

    def _observe_heap(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            stats = None if self._heap_stats is None else self._heap_stats()
            return [] if stats is None else [Observation(int(getattr(stats, field)))]

        return callback

    def cluster_retried(self) -> None:
        self.cluster_retries.add(1)

    def cluster_cancel(self, outcome: str) -> None:
        """One cancel of a replica's render: "stopped", "too_late" or "no_word"."""
        self.cluster_cancels.add(1, {"easel.cancel.outcome": outcome})

    def error(self, error_type: str, operation: str | None = None) -> None:
        attrs = {"error.type": error_type}
        if operation:
            attrs["rpc.method"] = operation
        self.errors.add(1, attrs)

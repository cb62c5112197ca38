"""The server's Prometheus metrics, named as the peers name theirs under ``ufaas_``.

What happens to a function is counted once, when it ends (:meth:`Metrics.finished`: two
dict look-ups and a few observes); everything else (pools, queue, downloads, sockets) is
read from the parts' own ``statistics()`` when ``/metrics`` is scraped, and costs nothing
between scrapes. Labels are bounded: images, pools, statuses and reasons, never an id or
a command.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

if TYPE_CHECKING:
    from .function import Function
    from .scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format every Prometheus reads
# Images seen get a label value of their own up to this many; the rest are "other".
MAX_IMAGE_LABELS = 100
OTHER = "other"
# Seconds: from a warm start (a few ms) to the longest timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
                300.0, 600.0)
POOL_STATES = (("warm", "idle"), ("busy", "busy"), ("starting", "starting"))


class Metrics:
    """The metrics of one server, in a registry of its own (several servers may share a
    process, as in the tests). Created with the scheduler it watches."""

    def __init__(self, scheduler: Scheduler, *, max_images: int = MAX_IMAGE_LABELS) -> None:
        self.scheduler = scheduler
        self.max_images = max_images
        self.registry = CollectorRegistry()
        self._invocations = Counter(
            "ufaas_function_invocation", "Functions finished, by image and final status",
            ["image", "status"], registry=self.registry)
        self._duration = Histogram(
            "ufaas_function_duration_seconds", "How long functions ran in their container",
            ["image"], buckets=DURATION_BUCKETS, registry=self.registry)
        self._queued = Histogram(
            "ufaas_function_queue_seconds", "How long functions waited for a container",
            ["image"], buckets=WAIT_BUCKETS, registry=self.registry)
        self._to_start = Histogram(
            "ufaas_function_start_delay_seconds", "From submission to the start in a "
            "container (downloads and predecessors included)", ["image"],
            buckets=WAIT_BUCKETS, registry=self.registry)
        self._locality = Counter(
            "ufaas_function_locality", "Follow-ups that ran in their predecessor's "
            "container (hit) or elsewhere (miss)", ["result"], registry=self.registry)
        self.registry.register(_Collected(scheduler))
        self._images: dict[str, str] = {}
        # The labelled children, looked up once: .labels() takes a lock and builds a key.
        self._counted: dict[tuple[str, str], Counter] = {}
        self._timed: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        scheduler.observers.append(self.finished)

    def finished(self, function: Function) -> None:
        """Count a function that has ended (the scheduler calls this once per function)."""
        record = function.record
        image = self._image(record.spec.get("image"), bool(record.spec.get("network")))
        key = (image, record.status)
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self._invocations.labels(*key)
        counter.inc()
        if record.started_at is None:
            return
        timed = self._timed.get(image)
        if timed is None:
            timed = self._timed[image] = (self._duration.labels(image),
                                          self._queued.labels(image),
                                          self._to_start.labels(image))
        duration, queued, to_start = timed
        if record.duration_ms is not None:
            duration.observe(record.duration_ms / 1000)
        queued.observe(function.waited)
        to_start.observe(max(record.started_at - record.created_at, 0.0))
        if record.locality is not None:
            self._locality.labels(record.locality).inc()

    def _image(self, image: object, network: bool) -> str:
        """The label of ``image``: how its pool names it when there is one, and while fewer
        than ``max_images`` labels are in use; else "other" (say, an image that does not
        exist), so that no caller can make the label set grow without end."""
        if not isinstance(image, str):
            return OTHER
        label = self._images.get(image)
        if label is None:
            pool = self.scheduler.running_pool(image, network)
            if pool is None or len(self._images) >= self.max_images:
                return OTHER
            label = self._images[image] = pool.reference
        return label

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Collected:
    """The metrics read from statistics() at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def describe(self) -> list[Metric]:
        return []  # names made at scrape time are checked by no registry

    def collect(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        labels = ["pool", "image"]
        containers = GaugeMetricFamily("ufaas_pool_containers", "Containers of each pool, by "
                                       "state", labels=[*labels, "state"])
        waiting = GaugeMetricFamily("ufaas_pool_waiting", "Functions waiting for a "
                                    "container of each pool", labels=labels)
        starts = CounterMetricFamily("ufaas_container_starts", "Containers started",
                                     labels=labels)
        failures = CounterMetricFamily("ufaas_container_start_failures", "Container starts "
                                       "that failed", labels=labels)
        retired = CounterMetricFamily("ufaas_container_retirements", "Containers taken out "
                                      "of service, by reason (lost, unclean and discarded "
                                      "ones are replaced)", labels=[*labels, "reason"])
        for pool in scheduler.pools:
            s = pool.statistics()
            # In a cluster a pool runs on each node, under one name: the node tells them apart.
            names = [s.name if pool.node is None else f"{s.name}@{pool.node}", pool.reference]
            for state, attribute in POOL_STATES:
                containers.add_metric([*names, state], getattr(s, attribute))
            waiting.add_metric(names, s.waiting)
            starts.add_metric(names, s.started)
            failures.add_metric(names, s.start_failures)
            for reason, count in s.retired.items():
                retired.add_metric([*names, reason], count)
        yield from (containers, waiting, starts, failures, retired)

        functions = scheduler.statistics()
        yield GaugeMetricFamily("ufaas_queue_length", "Functions accepted and not started",
                                value=functions.pending)
        yield GaugeMetricFamily("ufaas_functions_running", "Functions running now",
                                value=functions.running)

        downloads = scheduler.downloader.statistics()
        yield CounterMetricFamily("ufaas_url_downloads", "URL resources downloaded",
                                  value=downloads.downloads)
        yield CounterMetricFamily("ufaas_url_cache_hits", "URL resources served from the "
                                  "cache", value=downloads.cache_hits)
        yield GaugeMetricFamily("ufaas_url_downloads_in_flight", "Downloads under way",
                                value=downloads.in_flight)
        yield GaugeMetricFamily("ufaas_url_cache_bytes", "Bytes held by the download cache",
                                value=downloads.cached_bytes)

        files = scheduler.files_store.statistics()
        yield GaugeMetricFamily("ufaas_output_files_bytes", "Bytes of output files kept",
                                value=files["bytes"])
        yield GaugeMetricFamily("ufaas_output_files_max_bytes", "The budget of output files "
                                "(files_max_bytes)", value=files["max_bytes"])
        yield CounterMetricFamily("ufaas_output_files_cut", "Functions whose output files "
                                  "the budget cut", value=files["cut_by_budget"])
        sent = scheduler.callbacks.statistics()
        yield GaugeMetricFamily("ufaas_callbacks_sending", "Callbacks being sent",
                                value=sent["sending"])
        yield CounterMetricFamily("ufaas_callbacks_delivered", "Callbacks delivered",
                                  value=sent["delivered"])
        yield CounterMetricFamily("ufaas_callbacks_failed", "Callbacks given up after "
                                  "callback_attempts", value=sent["failed"])

        hub = scheduler.hub
        yield GaugeMetricFamily("ufaas_websocket_connections", "WebSocket clients connected",
                                value=hub.watching)
        yield CounterMetricFamily("ufaas_websocket_connections_opened", "WebSocket clients "
                                  "that connected since the start", value=hub.subscribed)

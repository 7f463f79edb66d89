"""The expert group as a Ray actor: an `ExpertGroupWorker` behind actor methods.

Batches run one at a time in the default concurrency group; health, stats, drain and weight loading
answer from a separate `control` group, so a health check is answered while a batch runs and a
stalled batch shows up as `running_for_s` growing. The actor asks Ray for GPUs (or a custom resource
per worker group) when the cluster has them, and runs on CPU otherwise.
"""

from __future__ import annotations

import datetime
import os
import re
import threading
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

from .batch import ExpertBatch, tensor_to_wire
from .channel import ChannelServer, connect
from .worker import ExpertGroupWorker


GROUP_FIELD = "{group}"
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # as the chart's values.schema.json allows
_RAY_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def check_resource_template(template: str, field: str = "custom_resource") -> None:
    """Raise ValueError naming `field` unless `template` is a Ray resource name ({group}: the group id)."""
    if not _RESOURCE_NAME.fullmatch(template.replace(GROUP_FIELD, "0")):
        raise ValueError(f"{field}: {template!r} is not a resource name: use letters, digits and _ . - only, "
                         f"with {GROUP_FIELD} for the expert group id (e.g. moeserve_expert_{GROUP_FIELD})")
    if template in _RAY_BUILTIN:
        raise ValueError(f"{field}: {template!r} is one of Ray's own resources; name a custom resource "
                         f"(e.g. moeserve_expert_{GROUP_FIELD})")


@dataclass(frozen=True, slots=True)
class GroupResources:
    """What one expert-group replica asks Ray for."""

    num_cpus: float = 0.0  # 0 lets several groups share the CPUs of a small machine
    num_gpus: float | None = None  # None: 1 if the cluster has GPUs, else 0; fractions share a GPU
    # One unit of this Ray resource per replica, {group} replaced by the group id (e.g. "moeserve_expert_{group}"):
    # the replica is placed only on nodes that offer it, and a pending one is demand for such a node.
    custom_resource: str | None = None
    torch_threads: int | None = None  # intra-op threads; match the trunk's for bitwise-equal CPU results
    device: str | None = None  # override the device choice ("cpu", "cuda")

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads: must be >= 1, got {self.torch_threads}")
        if self.custom_resource is not None:
            check_resource_template(self.custom_resource)

    def actor_options(self, group_id: int) -> dict:
        num_gpus = self.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": num_gpus}
        if self.custom_resource:
            opts["resources"] = {self.custom_resource.replace(GROUP_FIELD, str(group_id)): 1}
        return opts


@ray.remote(concurrency_groups={"control": 4})
class ExpertGroupActor:
    """One replica of one expert group."""

    def __init__(self, group_id: int, experts: tuple[int, ...], source, resources: GroupResources,
                 load_window_s: float = 60.0):
        if resources.torch_threads:
            torch.set_num_threads(resources.torch_threads)
        device = resources.device or ("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        self.worker = ExpertGroupWorker(group_id, tuple(experts), source, device, load_window_s=load_window_s)
        self._run_lock = threading.Lock()
        self._channels_lock = threading.Lock()
        self._channels: dict[str, ChannelServer] = {}  # open `gloo` channels by key

    def run(self, wire: tuple) -> tuple:
        return tensor_to_wire(self._run(ExpertBatch.from_wire(wire, self.worker.device)))

    def _run(self, batch: ExpertBatch) -> torch.Tensor:
        # One batch at a time, whichever transport brought it: Ray calls and every open channel.
        with self._run_lock:
            return self.worker.run(batch)

    @ray.method(concurrency_group="control")
    def open_channel(self, key: str, host: str, port: int, timeout_s: float) -> int:
        """Join the `gloo` transport's channel `key` (rendezvous store at host:port) as rank 1 and serve it
        on a thread of its own until the dispatcher closes it or goes away; returns this process's pid."""
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        pg = connect(store, key, 1, ray.util.get_node_ip_address(), timeout_s)
        with self._channels_lock:
            self._channels[key] = ChannelServer(key, pg, self._run, on_exit=self._channel_closed)
        return os.getpid()

    def _channel_closed(self, key: str) -> None:
        with self._channels_lock:
            self._channels.pop(key, None)

    @ray.method(concurrency_group="control")
    def ready(self) -> dict:
        ctx = ray.get_runtime_context()
        return {
            "group_id": self.worker.group_id,
            "experts": list(self.worker.experts),
            "layers": self.worker.layers,
            "device": str(self.worker.device),
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }

    @ray.method(concurrency_group="control")
    def health(self) -> dict:
        with self._channels_lock:
            return {**self.worker.health(), "channels": len(self._channels)}

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        with self._channels_lock:
            return {**self.worker.stats(), "channels": len(self._channels)}

    @ray.method(concurrency_group="control")
    def add_experts(self, experts: list[int]) -> list[int]:
        return list(self.worker.add_experts(list(experts)))

    @ray.method(concurrency_group="control")
    def drain(self, timeout_s: float) -> bool:
        """Stop taking batches, then wait for the held ones; True when none is left."""
        self.worker.begin_drain()
        return self.worker.wait_drained(timeout_s)

    @ray.method(concurrency_group="control")
    def inject_delay(self, seconds: float) -> None:
        self.worker.inject_delay(seconds)

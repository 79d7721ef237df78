"""Ray actors as the further ranks (`distributed_executor_backend="ray"`), for engines over more than one machine.

Rank 0's worker stays in the core's process, as with `mp`; ranks 1 .. world_size - 1 are Ray actors placed by a
placement group of one bundle per rank (a GPU each on GPUs), on the cluster at RAY_ADDRESS or, without one, on
a local cluster Ray starts here. The ranks meet in torch.distributed at this node's address, so the collectives
run over NCCL or gloo exactly as with `mp`; Ray only places and calls the workers.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.net import free_port
from tokenmill.distributed.parallel_state import destroy_distributed
from tokenmill.executor.base import Executor
from tokenmill.executor.multiproc import RankFailed
from tokenmill.source import ModelSource
from tokenmill.worker.worker import Worker


class RayWorker:
    """A further rank's worker inside a Ray actor (Ray shows the actor only its own GPU: device index 0)."""

    def __init__(self, config: EngineConfig, source: ModelSource, rank: int, init_method: str) -> None:
        self.worker = Worker(config, source, rank=rank, distributed_init_method=init_method, device_index=0)

    def ready(self) -> bool:
        return True

    def execute(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray") from None
    return ray


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        ray = _import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self._ray, self._remove_placement_group = ray, remove_placement_group
        world_size = config.parallel.world_size
        on_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
        bundle = {"GPU": 1, "CPU": 0.1} if on_gpu else {"CPU": 0.1}
        self.placement_group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        ray.get(self.placement_group.ready())
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        actor_class = ray.remote(RayWorker)

        def placed(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)

        self.actors = [actor_class.options(num_cpus=0.1, num_gpus=1 if on_gpu else 0, scheduling_strategy=placed(rank))
                       .remote(config, source, rank, init_method) for rank in range(1, world_size)]
        self._pending: list[Any] = []  # the last step calls' results, checked when a step fails
        try:
            self.driver = Worker(config, source, rank=0, distributed_init_method=init_method)
            self._get([actor.ready.remote() for actor in self.actors])
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args: Any) -> list[Any]:
        refs = [actor.execute.remote(method, *args) for actor in self.actors]
        local = self._checked(getattr(self.driver, method), *args)
        return [local, *self._get(refs)]

    def step(self, method: str, *args: Any) -> Any:
        self._pending = [actor.execute.remote(method, *args) for actor in self.actors]
        return self._checked(getattr(self.driver, method), *args)

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        self.actors = []
        if getattr(self, "placement_group", None) is not None:
            self._remove_placement_group(self.placement_group)
            self.placement_group = None
        destroy_distributed()

    def _checked(self, fn, *args: Any) -> Any:
        """fn's result; when it fails, a rank's own error if one failed first (its failure is usually what
        broke rank 0's collective)."""
        try:
            return fn(*args)
        except BaseException:
            ready, _ = self._ray.wait(self._pending, num_returns=len(self._pending), timeout=2.0)
            self._get(ready)
            raise

    def _get(self, refs: list[Any]) -> list[Any]:
        results = []
        for rank, ref in enumerate(refs, 1):
            try:
                results.append(self._ray.get(ref))
            except self._ray.exceptions.RayActorError as e:
                raise RankFailed(f"rank {rank}'s Ray actor died: {e}") from None
            except self._ray.exceptions.RayTaskError as e:
                raise RankFailed(f"rank {rank}'s worker failed: {e.cause!r}") from None
        return results

"""Tensor parallelism's control plane: one model over N processes, driven by rank 0.

Design
- Rank 0 is the engine: scheduler, block manager, sampling, scores and policies run there and
  nowhere else. Every rank holds its part of the model (engine.model.shard) and a KV cache of its
  KV heads with the same blocks, so the block manager's decisions hold for every cache.
- Each step rank 0 broadcasts the step's StepInput (plain numpy arrays, pickled) and then runs its
  own shard; every rank applies the step's copy-on-write copies and runs the same forward. Inside
  it the ranks exchange two all-reduces a layer, one for the embedding and one gather of the
  logits; nothing else crosses. Kernels, CUDA graphs (captured per rank, in the same order) and the
  self-evaluation score are unchanged: the score is read from the gathered logits on rank 0.
- Launch: `EngineConfig(tensor_parallel_size=N)` makes rank 0 spawn ranks 1..N-1
  (multiprocessing spawn) and join them in a torch.distributed group (gloo on CPU, NCCL on CUDA,
  rank r on cuda:r) over TCP on 127.0.0.1. Under torchrun (RANK and WORLD_SIZE set) the group
  comes from torchrun's environment instead: rank 0 builds the engine, and every other rank calls
  `run_worker(config)` (`selfeval serve` does), which is how several nodes are used.
- Setup crosses as one broadcast too: rank 0 sizes the KV cache and sends the block count, the
  longest sequence and the CUDA graph settings before any rank builds its runner.
- Messages from rank 0 (setup, each step, stop) cross a gloo control group of their own whose
  timeout is a year: a server idles between requests, and a collective's timeout must not end its
  ranks. The model's collectives use the main group (gloo or NCCL) and `tensor_parallel_timeout`.
- Failure: a rank that dies or raises closes its sockets, so the others' next collective fails
  within seconds. Rank 0 then raises WorkerError (no step can run without every shard), kills
  the workers it spawned and joins them; a worker whose rank 0 is gone sees its collective fail
  and exits. A stuck rank is bounded by `tensor_parallel_timeout`. Once a step is broadcast every
  rank must finish it: an exception in rank 0's forward ends the engine too, and a Ctrl-C that
  reaches rank 0 alone is held until its forward ends (then the core undoes the step as usual).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import WorkerError
from engine.model.shard import Shard


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.torch_device.type == "cuda" else "gloo"


def _rank_device(config: EngineConfig, rank: int) -> torch.device:
    if config.torch_device.type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return config.torch_device


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _timeout(config: EngineConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=config.tensor_parallel_timeout)


def _start_timeout(config: EngineConfig) -> datetime.timedelta:
    """How long ranks may take to start and join (importing torch, loading): minutes, not a
    collective's bound; a rank that dies meanwhile fails the start at once anyway."""
    return datetime.timedelta(seconds=max(config.tensor_parallel_timeout, 300.0))


_IDLE = datetime.timedelta(days=365)  # the control group's timeout: a server may idle for long


def _init_group(config: EngineConfig, rank: int, world: int, store=None):
    """Join the group (over `store` for ranks this engine spawned, else torchrun's environment) and
    return the control group: messages from rank 0 cross a gloo group of their own whose timeout
    is an idle server's, not a collective's (a dead peer still fails it at once: its socket closes)."""
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(_rank_device(config, rank))
    if store is None:
        dist.init_process_group(_backend(config), init_method="env://", rank=rank, world_size=world,
                                timeout=_timeout(config))
    else:
        dist.init_process_group(_backend(config), store=store, rank=rank, world_size=world,
                                timeout=_timeout(config))
    return dist.new_group(backend="gloo", timeout=_IDLE)


def _receive(control) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def run_worker(config: EngineConfig, rank: int | None = None, world: int | None = None,
               address: tuple[str, int] | None = None) -> None:
    """A rank > 0: load its shard, build its runner when rank 0 says how, then run every step rank
    0 broadcasts until told to stop. address: rank 0's store (spawned by it); None: torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    from engine.model.loader import load_model
    from engine.model.lora import has_adapter, load_adapter
    from engine.runner import ModelRunner

    rank = int(os.environ["RANK"]) if rank is None else rank
    world = int(os.environ["WORLD_SIZE"]) if world is None else world
    store = None
    if address is not None:
        store = dist.TCPStore(address[0], address[1], world, is_master=False, timeout=_start_timeout(config))
        store.set(f"joined/{rank}", "1")
    control = _init_group(config, rank, world, store)
    try:
        device = _rank_device(config, rank)
        shard = Shard(rank, world)
        model, _ = load_model(config.model, device, config.torch_dtype, config.load_format, shard)
        if config.adapter is not None:
            load_adapter(model, config.adapter)
        message = _receive(control)
        if message[0] == "stop":  # rank 0 failed to build its part
            return
        _, num_blocks, max_model_len, graphs = message
        runner = ModelRunner(model, device, config.torch_dtype, num_blocks, config.block_size, max_model_len,
                             graphs=graphs, max_graph_batch=config.max_num_seqs,
                             adapter_loaded=has_adapter(model))
        while True:
            message = _receive(control)
            if message[0] == "stop":
                break
            runner.execute(message[1])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallel:
    """Rank 0's side: the worker processes it started (none under torchrun) and the group."""

    def __init__(self, config: EngineConfig):
        from engine.model.config import ModelConfig
        from engine.model.loader import load_hf_config

        world = config.tensor_parallel_size
        self.config, self.workers, self.dead, self.closed = config, [], False, False
        hf = load_hf_config(config.model, weights=config.load_format == "auto")
        Shard(0, world).check(ModelConfig.from_hf(hf))  # before any process starts
        if _under_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world:
                raise WorkerError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but "
                                  f"tensor_parallel_size is {world}")
            self.control = _init_group(config, 0, world, None)
        else:
            if dist.is_initialized():
                raise WorkerError("a torch.distributed group is already running in this process; shut "
                                  "down the other tensor-parallel engine first")
            address = ("127.0.0.1", _free_port())
            store = dist.TCPStore(*address, world, is_master=True, wait_for_workers=False,
                                  timeout=_start_timeout(config))
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, world):
                process = ctx.Process(target=run_worker, args=(config, rank, world, address),
                                      name=f"selfeval-tp-{rank}", daemon=True)
                process.start()
                self.workers.append(process)
            try:
                self._wait_for_workers(store)
                self.control = _init_group(config, 0, world, store)
            except BaseException:
                self.dead = True
                self._stop_workers(timeout=0)
                raise
        self.shard = Shard(0, world)

    def _wait_for_workers(self, store) -> None:
        """Until every spawned rank has joined; one that exits first fails the start at once."""
        keys = [f"joined/{rank}" for rank in range(1, len(self.workers) + 1)]
        deadline = time.monotonic() + _start_timeout(self.config).total_seconds()
        while not store.check(keys):
            for rank, p in enumerate(self.workers, start=1):
                if not p.is_alive():
                    raise WorkerError(
                        f"tensor-parallel rank {rank} exited with code {p.exitcode} before joining (its "
                        f"traceback is above; a script that starts ranks must guard its entry point "
                        f"with `if __name__ == '__main__':`)")
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel ranks did not join within "
                                  f"{_start_timeout(self.config).total_seconds():.0f} s")
            time.sleep(0.05)

    def setup(self, num_blocks: int, max_model_len: int, graphs: str | None) -> None:
        self._send(("setup", num_blocks, max_model_len, graphs))

    def run(self, step) -> None:
        self._send(("step", step))

    def _send(self, message: tuple) -> None:
        if self.dead:
            raise WorkerError("a tensor-parallel rank failed earlier: shut this engine down and start "
                              "another")
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except Exception as e:  # noqa: BLE001 - a rank is gone: say which, stop the rest
            raise self.failed(e) from e

    def failed(self, error: BaseException) -> WorkerError:
        """The engine cannot step any more: stop every worker; the error to raise."""
        self.dead = True
        deadline = time.monotonic() + 2.0  # a peer's socket can close a moment before it is reaped
        while self.workers and all(p.is_alive() for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        exits = [f"rank {i + 1} exited with code {p.exitcode}" for i, p in enumerate(self.workers)
                 if not p.is_alive()]
        self._stop_workers(timeout=0)
        return WorkerError(f"tensor parallelism failed ({'; '.join(exits) or error!r}); the engine "
                           f"cannot step any more: shut it down and start another")

    def _stop_workers(self, timeout: float = 5.0) -> None:
        for p in self.workers:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
                p.join()

    def shutdown(self) -> None:
        """Tell the workers to stop, join them (killing stragglers) and leave the group. Once: a
        later call must not tear down a group another engine made since."""
        if self.closed:
            return
        self.closed = True
        if not self.dead:
            try:
                self._send(("stop",))
            except WorkerError:
                pass
        self.dead = True
        self._stop_workers()
        if dist.is_initialized():
            dist.destroy_process_group()


class TensorParallelRunner:
    """Rank 0's runner: broadcasts each step before running its own shard of it."""

    def __init__(self, runner, tp: TensorParallel):
        self.runner, self.tp = runner, tp

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, step, phase=None) -> torch.Tensor:
        """Once the step is broadcast every rank must finish it, so a Ctrl-C that reaches this
        process alone (a notebook's interrupt) waits for the forward to end and is raised then:
        the core undoes the step as usual. Any other failure here leaves the ranks out of step."""
        interrupted = []
        previous = None
        if threading.current_thread() is threading.main_thread():  # held from before the broadcast
            previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        try:
            self.tp.run(step)
            try:
                logits = self.runner.execute(step, phase)
            except BaseException as e:  # the ranks' collectives are out of step now (or a rank is gone)
                raise self.tp.failed(e) from e
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt
        return logits

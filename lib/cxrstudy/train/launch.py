"""Start one training function on several processes (data-parallel, DDP) from a notebook.

A :class:`LaunchPlan` says how many processes run on this machine and, for several machines,
which one this is and where process 0 listens. It comes from ``num_processes`` (one machine) or
from an Accelerate config file (``accelerate config`` writes one; keys ``num_processes`` (all
machines together), ``num_machines``, ``machine_rank``, ``main_process_ip``,
``main_process_port``). :func:`launch` hands it to Accelerate's ``notebook_launcher``, which forks
the processes (nothing is pickled, so a notebook's objects reach them as they are) and sets
``RANK``/``WORLD_SIZE`` so every :class:`~cxrstudy.train.Trainer` built inside joins the group:
NCCL on GPUs, gloo on CPUs.

The notebook process must not have touched CUDA or built an ``Accelerator`` before a launch:
forked processes cannot use a CUDA context their parent opened (Accelerate refuses with a message
saying so).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml


@dataclass(frozen=True)
class LaunchPlan:
    """Processes on this machine, machines in all, this machine's rank, process 0's address."""

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int | None = None  # None: a free port (one machine only)

    def __post_init__(self):
        if int(self.num_processes) < 1 or int(self.num_machines) < 1:
            raise ValueError(f"num_processes and num_machines must be at least 1, got "
                             f"{self.num_processes} and {self.num_machines}")
        if not 0 <= int(self.machine_rank) < int(self.num_machines):
            raise ValueError(f"machine_rank must lie in [0, {self.num_machines}), got "
                             f"{self.machine_rank}")
        if self.num_machines > 1 and self.main_process_port is None:
            raise ValueError("several machines need a main_process_port they all agree on")

    @property
    def world_size(self) -> int:
        return int(self.num_processes) * int(self.num_machines)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_accelerate_config(path) -> dict[str, Any]:
    """The keys of an Accelerate config file (YAML or JSON) that a launch needs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Accelerate config file at {path} (write one with "
                                f"`accelerate config --config_file {path}`)")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a mapping of Accelerate settings")
    return config


def plan_launch(num_processes: int = 1, accelerate_config=None) -> LaunchPlan:
    """A plan from ``num_processes`` (one machine), or from an Accelerate config file.

    In the file ``num_processes`` counts every process on every machine (Accelerate's meaning);
    the plan keeps the number per machine, which must divide evenly.
    """
    if accelerate_config is None:
        return LaunchPlan(num_processes=int(num_processes))
    config = read_accelerate_config(accelerate_config)
    machines = int(config.get("num_machines", 1))
    total = int(config.get("num_processes", num_processes))
    if total % machines:
        raise ValueError(f"{accelerate_config}: num_processes {total} is not a multiple of "
                         f"num_machines {machines}")
    port = config.get("main_process_port")
    return LaunchPlan(num_processes=total // machines, num_machines=machines,
                      machine_rank=int(config.get("machine_rank", 0)),
                      main_process_ip=str(config.get("main_process_ip") or "127.0.0.1"),
                      main_process_port=None if port is None else int(port))


def free_port() -> int:
    """A TCP port nobody listens on now (for process 0 of a one-machine launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(function: Callable, args=(), plan: LaunchPlan | None = None) -> None:
    """Run ``function(*args)`` in every process of ``plan`` on this machine; returns when all
    have finished (an exception in any of them is raised here)."""
    import torch
    from accelerate import notebook_launcher

    plan = plan or LaunchPlan()
    if torch.cuda.is_initialized():
        raise RuntimeError("this process has already used CUDA (a model or tensor on the GPU, "
                           "e.g. a teacher's predictions), and processes forked from it cannot; "
                           "launch data-parallel runs before any GPU work in the notebook, or "
                           "restart its kernel")
    if plan.num_machines > 1 and plan.num_processes == 1:
        raise ValueError("Accelerate's notebook launcher starts processes only when there are "
                         "several per machine; with one process on each of several machines run "
                         "the notebook as a script under `accelerate launch` instead")
    port = plan.main_process_port or free_port()
    notebook_launcher(function, args=tuple(args), num_processes=int(plan.num_processes),
                      num_nodes=int(plan.num_machines), node_rank=int(plan.machine_rank),
                      master_addr=plan.main_process_ip, use_port=str(port))


__all__ = ["LaunchPlan", "plan_launch", "read_accelerate_config", "launch", "free_port"]

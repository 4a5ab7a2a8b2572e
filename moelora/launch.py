"""Starting the processes a hardware preset asks for with the standard launchers.

`moelora train hardware=zero2 hardware.num_processes=8 ...` outside a distributed launch runs
`accelerate launch` (or torchrun / deepspeed, `hardware.launcher`) on `python -m moelora train`
with the same overrides and this run's directory, so every rank shares one run dir. A run over
several machines cannot be started from one of them: the command for each machine is printed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from moelora.config import HardwareConfig
from moelora.errors import UserError
from moelora.hardware import on_cpu, world_size


def needs_launch(hardware: HardwareConfig) -> bool:
    """True when the preset wants more processes than this one and no launcher started us."""
    wanted = hardware.num_processes * hardware.num_machines
    return wanted > 1 and "LOCAL_RANK" not in os.environ and world_size() == 1


def launch_command(
    hardware: HardwareConfig, overrides: list[str], run_dir: str, machine_rank: str = "0"
) -> tuple[dict[str, str], list[str]]:
    """(extra environment, argv) that start this run on one machine with the chosen launcher."""
    per_machine, machines = hardware.num_processes, hardware.num_machines
    program = ["-m", "moelora", "train", *_without_run_dir(overrides), f"run_dir={run_dir}"]
    env: dict[str, str] = {}
    cpu = on_cpu(hardware)
    if cpu and hardware.strategy != "deepspeed":
        # DDP over gloo on a machine without GPUs (DeepSpeed picks its CPU accelerator itself).
        env["ACCELERATE_USE_CPU"] = "1"
    rendezvous = ["--main_process_ip", "$MAIN_IP"] if machines > 1 else []
    if hardware.launcher == "torchrun":
        nodes = [f"--nnodes={machines}", f"--node_rank={machine_rank}"] if machines > 1 else []
        master = ["--master_addr=$MAIN_IP"] if machines > 1 else []
        argv = [
            "torchrun",
            f"--nproc_per_node={per_machine}",
            *nodes,
            *master,
            f"--master_port={hardware.main_process_port}",
            *program,
        ]
    elif hardware.launcher == "deepspeed":
        if machines > 1:
            raise UserError(
                "hardware.launcher=deepspeed over several machines needs its hostfile; use "
                "hardware.launcher=accelerate (or torchrun) for multi-node runs."
            )
        argv = [
            "deepspeed",
            "--num_gpus",  # also the process count on a CPU machine
            str(per_machine),
            "--master_port",
            str(hardware.main_process_port),
            "--no_local_rank",  # LOCAL_RANK is in the environment; Hydra takes no --flags
            "--module",
            *program[1:],
        ]
    else:
        mode = ["--use_deepspeed"] if hardware.strategy == "deepspeed" else ["--multi_gpu"]
        machine = ["--num_machines", str(machines), "--machine_rank", machine_rank] * (machines > 1)
        argv = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *mode,
            "--num_processes",
            str(per_machine * machines),
            "--mixed_precision",
            "no" if cpu else hardware.mixed_precision,
            "--dynamo_backend",
            "no",
            *machine,
            *rendezvous,
            "--main_process_port",
            str(hardware.main_process_port),
            *program,
        ]
    return env, argv


def shell_line(env: dict[str, str], argv: list[str]) -> str:
    words = [f"{k}={v}" for k, v in env.items()] + [
        a if a.startswith("$") else shlex.quote(a) for a in argv
    ]
    return " ".join(words)


def launch(hardware: HardwareConfig, overrides: list[str], run_dir: str) -> None:
    """Run the launch on this machine and wait; print the per-machine commands for several."""
    if hardware.num_machines > 1:
        lines = [
            shell_line(*launch_command(hardware, overrides, run_dir, str(rank)))
            for rank in range(hardware.num_machines)
        ]
        print(
            f"this run spans {hardware.num_machines} machines: on each, with MAIN_IP set to the "
            f"first machine's address and a shared run_dir, run\n"
            + "\n".join(f"  machine {rank}: {line}" for rank, line in enumerate(lines))
        )
        return
    env, argv = launch_command(hardware, overrides, run_dir)
    print(f"launching {hardware.num_processes} processes: {shell_line(env, argv)}", flush=True)
    done = subprocess.run(argv, env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        raise UserError(
            f"the launched run failed (exit {done.returncode}); its processes printed why above."
        )


def _without_run_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("run_dir=")]

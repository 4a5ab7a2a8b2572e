"""Starting the processes a hardware preset asks for with the standard launchers.

`moelora train hardware=zero2 hardware.num_processes=8 ...` outside a distributed launch runs
`accelerate launch` (or torchrun / deepspeed, `hardware.launcher`) on `python -m moelora train`
with the same overrides and this run's directory pinned, so every rank shares one run dir
(`moelora eval` likewise, with its output_dir). A run over several machines cannot be started
from one of them: the command for each machine is printed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from types import FrameType

from hydra.core.hydra_config import HydraConfig

from moelora.config import HardwareConfig
from moelora.errors import UserError
from moelora.hardware import on_cpu, world_size
from moelora.log import get_logger
from moelora.signals import SIGNALS, interrupted

log = get_logger(__name__)


def needs_launch(hardware: HardwareConfig) -> bool:
    """True when no launcher started this process and the preset wants more than one process,
    or DeepSpeed (whose engine needs a launcher's process group, even for one process)."""
    wanted = hardware.num_processes * hardware.num_machines
    multi = wanted > 1 or hardware.strategy == "deepspeed"
    return multi and "LOCAL_RANK" not in os.environ and world_size() == 1


def launch_command(
    hardware: HardwareConfig,
    command: str,
    overrides: list[str],
    pinned: str,
    machine_rank: str = "0",
) -> tuple[dict[str, str], list[str]]:
    """(extra environment, argv) that start `moelora <command>` on one machine with the chosen
    launcher; `pinned` ("run_dir=...") replaces the user's value of that key for every rank."""
    key = pinned.split("=", 1)[0] + "="
    kept = [o for o in overrides if not o.startswith(key)]
    program = ["moelora", command, *kept, pinned]
    env: dict[str, str] = {}
    if on_cpu(hardware) and hardware.strategy != "deepspeed":
        # DDP over gloo on a machine without GPUs (DeepSpeed picks its CPU accelerator itself).
        env["ACCELERATE_USE_CPU"] = "1"
    if hardware.launcher == "torchrun":
        return env, _torchrun(hardware, machine_rank) + ["-m", *program]
    if hardware.launcher == "deepspeed":
        return env, _deepspeed(hardware) + ["--module", *program]
    return env, _accelerate(hardware, machine_rank) + ["-m", *program]


def _torchrun(hardware: HardwareConfig, machine_rank: str) -> list[str]:
    argv = ["torchrun", f"--nproc_per_node={hardware.num_processes}"]
    if hardware.num_machines > 1:
        argv += [f"--nnodes={hardware.num_machines}", f"--node_rank={machine_rank}"]
        argv += ["--master_addr", "$MAIN_IP"]
    return argv + [f"--master_port={hardware.main_process_port}"]


def _deepspeed(hardware: HardwareConfig) -> list[str]:
    if hardware.num_machines > 1:
        raise UserError(
            "hardware.launcher=deepspeed over several machines needs its hostfile; use "
            "hardware.launcher=accelerate (or torchrun) for multi-node runs."
        )
    # The deepspeed runner ignores CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1 unless told.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and not on_cpu(hardware):
        devices = ["--include", f"localhost:{visible}"]
    else:
        devices = ["--num_gpus", str(hardware.num_processes)]  # the process count on a CPU
    port = ["--master_port", str(hardware.main_process_port)]
    # LOCAL_RANK is in the environment; Hydra takes no --local_rank flag.
    return ["deepspeed", *devices, *port, "--no_local_rank"]


def _accelerate(hardware: HardwareConfig, machine_rank: str) -> list[str]:
    machines = hardware.num_machines
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    argv += ["--use_deepspeed"] if hardware.strategy == "deepspeed" else ["--multi_gpu"]
    argv += ["--num_processes", str(hardware.num_processes * machines)]
    argv += ["--mixed_precision", "no" if on_cpu(hardware) else hardware.mixed_precision]
    argv += ["--dynamo_backend", "no"]
    if machines > 1:
        argv += ["--num_machines", str(machines), "--machine_rank", machine_rank]
        argv += ["--main_process_ip", "$MAIN_IP"]
        if hardware.strategy == "deepspeed":  # each machine joins; not pdsh over ssh
            argv += ["--deepspeed_multinode_launcher", "standard"]
    return argv + ["--main_process_port", str(hardware.main_process_port)]


def shell_line(env: dict[str, str], argv: list[str]) -> str:
    words = [f"{k}={v}" for k, v in env.items()] + [
        a if a.startswith("$") else shlex.quote(a) for a in argv
    ]
    return " ".join(words)


def launch(hardware: HardwareConfig, command: str, overrides: list[str], pinned: str) -> None:
    """Run the launch on this machine and wait; print the per-machine commands for several."""
    if hardware.num_machines > 1:
        lines = [
            shell_line(*launch_command(hardware, command, overrides, pinned, str(rank)))
            for rank in range(hardware.num_machines)
        ]
        log.info(
            f"this run spans {hardware.num_machines} machines: on each, with MAIN_IP set to the "
            f"first machine's address and {pinned.split('=', 1)[0]} on shared storage, run\n"
            + "\n".join(f"  machine {rank}: {line}" for rank, line in enumerate(lines))
        )
        return
    env, argv = launch_command(hardware, command, overrides, pinned)
    log.info(f"launching {hardware.num_processes} processes: {shell_line(env, argv)}")
    code, signum = _wait_forwarding_signals(argv, {**os.environ, **env})
    if signum is not None:
        raise interrupted(
            signum,
            f"the launched processes stopped on {signal.Signals(signum).name} and wrote a "
            f"checkpoint (see above); resume with the same command and trainer.resume=true.",
        )
    if code != 0:
        raise UserError(f"the launched run failed (exit {code}); its processes printed why above.")


def _wait_forwarding_signals(argv: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run the launcher and pass a stop signal on to it as SIGTERM, which torchrun, accelerate
    and deepspeed forward to every process (SIGUSR1 would end the launcher itself). Ctrl-C is
    not passed on: the terminal sends it to the whole process group already."""
    child = subprocess.Popen(argv, env=env)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if signum != signal.SIGINT:
            child.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, received[0] if received else None


def launch_this_command(hardware: HardwareConfig, command: str, pinned: str) -> None:
    """Launch the running Hydra command again, with its command-line overrides, over the
    processes `hardware` asks for."""
    if not HydraConfig.initialized():
        raise UserError(
            f"hardware={hardware.name} (strategy {hardware.strategy}, "
            f"{hardware.num_processes} processes) needs a distributed launch; start it with the "
            f"moelora command, which launches the processes."
        )
    launch(hardware, command, list(HydraConfig.get().overrides.task), pinned)

"""The hardware a run uses, detected once and passed down: the device, its precision, the processes.

Like nanochat's ``compute_init``, :meth:`Hardware.detect` is the one place that asks torch about
the GPU and reads the launcher's environment (``torchrun`` and ``accelerate launch`` set
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``). Everything downstream, from the quantisation config
to the Trainer's precision flags and the plan's batch split, reads the same object, so a chosen
device (say, ``Hardware.card("T4")`` to plan a Colab run from a laptop) is honoured everywhere.

Only the standard library is imported at module level (the environment check imports this module
before the pinned packages are installed); torch is imported where it is needed.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BF16_CAPABILITY = (8, 0)  # bf16 tensor cores: Ampere and newer (A100, L4, H100); a T4 is 7.5
# GPUs the course plans for, as torch reports them (name, compute capability, total memory in GiB).
CARDS = {
    "T4": ("Tesla T4", (7, 5), 14.6),
    "L4": ("NVIDIA L4", (8, 9), 22.0),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), 39.4),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 79.1),
    "H200": ("NVIDIA H200", (9, 0), 139.8),
}


def this_machine() -> str:
    """This computer: its host name, processor and cores ("colab-vm (Intel Xeon @ 2.20GHz, 2 cores)")."""
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            processor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             processor)
    except OSError:  # not Linux
        pass
    return f"{platform.node()} ({processor}, {os.cpu_count()} cores)"


@dataclass(frozen=True)
class Hardware:
    """One process's view of the machine: its device and the data-parallel group it belongs to."""

    kind: str  # "cuda", "mps" or "cpu"
    name: str
    capability: tuple[int, int] | None = None
    memory_gib: float | None = None  # total memory of one GPU
    world_size: int = 1  # processes training together (one per GPU, or several on a CPU)
    rank: int = 0
    local_rank: int = 0
    machine: str = ""  # the computer (host, processor, cores), as run cards record it; "" for a planned card

    # --- precision ------------------------------------------------------------------------
    @property
    def bf16(self) -> bool:
        """bf16 needs compute capability 8.0+."""
        return self.kind == "cuda" and self.capability is not None and self.capability >= BF16_CAPABILITY

    @property
    def precision(self) -> str:
        """"bf16" on Ampere and newer, "fp16" on older GPUs (a T4), "fp32" on a CPU."""
        if self.kind != "cuda":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the 4-bit weights are dequantised to and the matrix products run in."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    @property
    def amp_flags(self) -> dict[str, bool]:
        """The Trainer's mixed-precision flags for this device."""
        return {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}

    # --- placement and processes -----------------------------------------------------------
    @property
    def device_map(self) -> dict[str, int | str]:
        """The whole model on this process's device: its own GPU under a launcher, else the CPU."""
        return {"": self.local_rank} if self.kind == "cuda" else {"": "cpu"}

    @property
    def is_main(self) -> bool:
        """The one process that prints and writes (adapter, run card, TensorBoard, run settings)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every process (a no-op for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, value: object) -> object:
        """The main process's ``value``, on every process (so that all take the same decision)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: object) -> list[object]:
        """``value`` from every process, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # --- making one ------------------------------------------------------------------------
    @classmethod
    def card(cls, key: str, processes: int = 1) -> Hardware:
        """A GPU the course plans for (``"T4"``, ``"A100"``, ... or ``"cpu"``), to plan a run for another machine."""
        if key == "cpu":
            return cls("cpu", "CPU", world_size=processes)
        name, capability, memory = CARDS[key]
        return cls("cuda", name, capability, memory, world_size=processes)

    @classmethod
    def detect(cls) -> Hardware:
        """This process's hardware. Under ``torchrun`` / ``accelerate launch`` it joins the process group
        (gloo on CPU, NCCL on GPUs) through accelerate, so that every later step finds it ready."""
        import torch

        world_size = int(os.environ.get("WORLD_SIZE", 1))
        rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(local_rank)
            found = cls("cuda", props.name, (props.major, props.minor), props.total_memory / 2**30)
        elif torch.backends.mps.is_available():
            found = cls("mps", "Apple GPU (MPS; bitsandbytes 4-bit needs CUDA or CPU)")
        else:
            found = cls("cpu", "CPU")
        if world_size > 1:
            from accelerate import PartialState

            PartialState(cpu=found.kind == "cpu")  # the process group the Trainer uses too
        return replace(found, world_size=world_size, rank=rank, local_rank=local_rank, machine=this_machine())

    def __str__(self) -> str:
        processes = f", {self.world_size} processes" if self.distributed else ""
        if self.kind != "cuda":
            return f"{self.name}, {self.precision}{processes}"
        major, minor = self.capability
        return (f"{self.name}, compute capability {major}.{minor}, {self.memory_gib:.1f} GiB, "
                f"{self.precision}{processes}")

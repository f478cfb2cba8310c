"""Environment check: pinned packages, the device, the profile, and what to do when one fails."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from helpers import config

REQUIREMENT_FILES = (config.REPO_ROOT / "requirements.txt", config.REPO_ROOT / "requirements-smoke.txt")
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")
FIXES = {
    "torch": "On Colab or CUDA keep the preinstalled torch (a different build is fine if `import torch` "
             "works); on CPU run `make setup`, which installs the CPU wheel torch==2.13.0.",
    "default": "Run `make setup` (or `pip install -r requirements.txt`) in this environment, then restart "
               "the kernel.",
}
# Packages whose exact version matters less than having one: Colab ships its own torch.
FLEXIBLE_ON_CUDA = frozenset({"torch"})


@dataclass(frozen=True)
class PackageCheck:
    name: str
    wanted: str
    installed: str | None
    any_version: bool = False  # installed at all is enough (Colab's own CUDA torch)

    @property
    def ok(self) -> bool:
        return self.installed is not None and (self.any_version or self.installed.split("+")[0] == self.wanted)

    def line(self) -> str:
        status = "[OK]  " if self.ok else "[FAIL]"
        found = self.installed or "not installed"
        fix = "" if self.ok else f"  -> {FIXES.get(self.name, FIXES['default'])}"
        return f"{status} {self.name}=={self.wanted} (found {found}){fix}"


def pinned_requirements() -> dict[str, str]:
    """``{package: version}`` for every ``name==version`` line of the requirements files."""
    lines = [line.strip() for path in REQUIREMENT_FILES for line in path.read_text().splitlines()]
    return {match.group(1): match.group(2) for match in map(_PIN.match, lines) if match}


def check_packages(any_version: frozenset[str] = frozenset()) -> list[PackageCheck]:
    """The installed version of every pinned package, next to the pin (``any_version``: presence only)."""
    checks = []
    for name, wanted in pinned_requirements().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        checks.append(PackageCheck(name, wanted, installed, name in any_version))
    return checks


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda", "mps" or "cpu"
    name: str
    capability: tuple[int, int] | None
    memory_gib: float | None

    @property
    def bf16(self) -> bool:
        """bf16 training needs compute capability 8.0+ (Ampere: A100, L4, H100; a T4 is 7.5)."""
        return self.capability is not None and self.capability >= (8, 0)

    def line(self) -> str:
        if self.kind != "cuda":
            return (f"[OK]   device: {self.name}. Fine for the smoke profile; the full profile "
                    "(Llama-3.1-8B) needs a CUDA GPU with 16 GB+ (Colab T4 works with batch 1).")
        precision = "bf16" if self.bf16 else "fp16 (no bf16 before compute capability 8.0)"
        return (f"[OK]   device: {self.name}, compute capability {self.capability[0]}.{self.capability[1]}, "
                f"{self.memory_gib:.1f} GiB, trains in {precision}")


def detect_device() -> Device:
    """The accelerator torch will use."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, (props.major, props.minor), props.total_memory / 2**30)
    if torch.backends.mps.is_available():
        return Device("mps", "Apple GPU (MPS; bitsandbytes 4-bit needs CUDA or CPU)", None, None)
    return Device("cpu", "CPU", None, None)


def in_colab() -> bool:
    return "google.colab" in sys.modules


def report(profile: config.Profile) -> str:
    """A printable environment report: Python, pinned packages, device, profile."""
    device = detect_device()
    packages = check_packages(FLEXIBLE_ON_CUDA if device.kind == "cuda" else frozenset())
    lines = [f"[{'OK' if sys.version_info >= (3, 10) else 'FAIL'}]   Python {sys.version.split()[0]}"]
    lines += [check.line() for check in packages]
    lines.append(device.line())
    source = profile.data_source if profile.data_source == "hub" else Path(profile.data_source).name
    lines.append(f"[OK]   profile: {profile.name} (data: {source}, model: {profile.base_model}"
                 f"{', Colab' if in_colab() else ''})")
    failed = sum(not check.ok for check in packages)
    lines.append("All checks passed." if not failed else f"{failed} check(s) failed: see the fixes above.")
    return "\n".join(lines)

"""Environment check and Colab set-up: pinned packages, the device, the profile, and what to do when one fails.

Only the standard library is imported at module level: the Colab set-up runs before the pinned
packages are installed, and must not load one of them (that would force a restart).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from helpers import config
from helpers.hardware import Hardware

REQUIREMENT_FILES = (config.REPO_ROOT / "requirements.txt", config.REPO_ROOT / "requirements-smoke.txt")
MIN_PYTHON = (3, 11)  # the oldest Python every pin installs on (tests/test_setup.py checks, as does pyproject.toml)
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")
FIXES = {
    "torch": "On Colab or CUDA keep the preinstalled torch (a different build is fine if `import torch` "
             "works); on CPU run `make setup`, which installs the CPU wheel torch==2.13.0.",
    "default": "Run `make setup` (or `pip install -r requirements.txt`) in this environment, then restart "
               "the kernel.",
}
# Packages whose exact version matters less than having one: Colab and CUDA machines keep their own torch.
OWN_BUILD_OK = frozenset({"torch"})
DRIVE_MOUNT = Path("/content/drive")
INSTALL_TAIL_CHARS = 3_000  # of pip's output, shown when `make colab` fails
RESTART_HELP = (
    "The install replaced {packages}, already imported in this session: their old versions are still in "
    "memory. Restart the session (Runtime > Restart session), then run this notebook again from the top; "
    "the second run finds everything installed and goes on."
)


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
    lines = [line.strip() for path in REQUIREMENT_FILES for line in path.read_text(encoding="utf-8").splitlines()]
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


def device_line(hardware: Hardware) -> str:
    """The environment report's line for the device: what it trains in, what it suits."""
    if hardware.kind != "cuda":
        return (f"[OK]   device: {hardware.name}. Fine for the smoke profile; the full profile "
                "(Llama-3.1-8B) needs a CUDA GPU with 16 GB+ (the lite profile fits a free Colab T4).")
    precision = "bf16" if hardware.bf16 else "fp16 (no bf16 before compute capability 8.0)"
    major, minor = hardware.capability
    return (f"[OK]   device: {hardware.name}, compute capability {major}.{minor}, {hardware.memory_gib:.1f} GiB, "
            f"trains in {precision}")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """``{distribution: version}`` of what is installed now (read from disk, not from memory)."""
    importlib.invalidate_caches()
    versions: dict[str, str] = {}
    for distribution in metadata.distributions():  # the first one on sys.path is the one imported
        versions.setdefault(_normalised(distribution.metadata["Name"]), distribution.version)
    return versions


def loaded_distributions(modules: dict | None = None) -> set[str]:
    """The distributions that provide a module already imported (``modules``: ``sys.modules``)."""
    provides = metadata.packages_distributions()
    top_level = {name.partition(".")[0] for name in (sys.modules if modules is None else modules)}
    return {_normalised(dist) for name in top_level for dist in provides.get(name, ())}


def replaced_while_loaded(before: dict[str, str], after: dict[str, str], loaded: set[str]) -> list[str]:
    """Loaded distributions whose installed version changed: the kernel must restart to use the new one."""
    return sorted(name for name in loaded if name in before and after.get(name) != before[name])


class RestartRequired(RuntimeError):
    """The install replaced a package this Python had already imported."""


def colab_setup(home: str = "") -> None:
    """On Colab: mount Google Drive when ``home`` is on it, then install the pins (Colab's torch is kept).

    A second run after the restart finds every pin installed and returns at once. Raises
    :class:`RestartRequired` when the install replaced an already imported package.
    """
    if home and Path(home).is_relative_to(DRIVE_MOUNT):
        from google.colab import drive

        drive.mount(str(DRIVE_MOUNT))
    missing = [check.name for check in check_packages(OWN_BUILD_OK) if not check.ok]
    if not missing:
        print("Every pinned package is installed.")
        return
    print(f"Installing the pinned requirements ({len(missing)} missing or at another version), a few minutes...")
    before, loaded = installed_versions(), loaded_distributions()
    install = subprocess.run(["make", "colab", f"PYTHON={sys.executable}"], cwd=config.REPO_ROOT,
                             capture_output=True, text=True, encoding="utf-8")
    if install.returncode:
        raise RuntimeError(f"`make colab` failed:\n{(install.stdout + install.stderr)[-INSTALL_TAIL_CHARS:]}\n"
                           "Fix the error above (a pin that needs a newer torch than Colab's: see "
                           "docs/troubleshooting.md), then run this cell again.")
    replaced = replaced_while_loaded(before, installed_versions(), loaded)
    if replaced:
        raise RestartRequired(RESTART_HELP.format(packages=", ".join(replaced)))
    print("Installed.")


def report(profile: config.Profile) -> str:
    """A printable environment report: Python, pinned packages, device, profile, state folder."""
    hardware = Hardware.detect()
    packages = check_packages(OWN_BUILD_OK if hardware.kind == "cuda" or in_colab() else frozenset())
    python_ok = sys.version_info >= MIN_PYTHON
    python = f"Python {sys.version.split()[0]}"
    lines = [f"[OK]   {python}" if python_ok else
             f"[FAIL] {python}  -> the pins need Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+: make a venv with one"]
    lines += [check.line() for check in packages]
    lines.append(device_line(hardware))
    source = Path(profile.data_source).name if Path(profile.data_source).exists() else profile.data_source
    lines.append(f"[OK]   profile: {profile.name} (data: {source}, model: {profile.base_model}"
                 f"{', Colab' if in_colab() else ''})")
    if config.base_license(profile.base_model).startswith("llama"):
        lines.append(f"[NOTE] {profile.base_model} is gated: accept Meta's license on its hub page and set HF_TOKEN; "
                     f"without Llama access use PROFILE = \"lite-open\" ({config.OPEN_HUB_ID}, Apache-2.0, no gate)")
    lines.append(f"[OK]   state folder: {config.HOME} (curated data, runs, results; asset cache {config.CACHE_DIR})")
    failed = sum(not check.ok for check in packages) + (not python_ok)
    lines.append("All checks passed." if not failed else f"{failed} check(s) failed: see the fixes above.")
    return "\n".join(lines)

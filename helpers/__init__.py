"""Book Pricer: the course's package. The state folder is settled first, before any Hugging Face import."""

# config first: it sets HOME and, for a chosen folder, HF_HOME; noise silences known library messages, with reasons
from helpers import config, noise  # noqa: F401  # isort: skip

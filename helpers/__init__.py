"""Book Pricer: the course's package. The state folder is settled first, before any Hugging Face import."""

from helpers import config  # noqa: F401  (sets HOME and, for a chosen folder, HF_HOME)

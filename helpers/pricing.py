"""What prices books: the :class:`Predictor` protocol every model is called through, and its readings' names.

Nothing here loads a model (no torch), so the harness, the classical baselines and the LLM predictors all
import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

from helpers.items import Item

POINT = "point"  # the reading of a predictor that answers one price per book
Reading = Literal["median", "mean", "argmax"]  # the readings of a price distribution (helpers.predict)


class Predictor(Protocol):
    """Prices books: ``predictor(items)`` answers one price per book, in order.

    A classical baseline answers an array; an LLM predictor a :class:`helpers.predict.PriceDistributions`
    (which also has ``reading`` and ``interval(level)``) or :class:`helpers.predict.GeneratedPrices`. The
    harness (:func:`helpers.evaluate.evaluate`) checks every answer.
    """

    def __call__(self, items: list[Item]) -> Sequence[object] | np.ndarray: ...

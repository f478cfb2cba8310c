"""One book: scrub its raw fields into prompt text, pull out hand features, build prompts.

Every model in the course, classical or LLM, reads the same :class:`Item`.
"""

from __future__ import annotations

import ast
import html
import json
import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from helpers import config

# --- scrubbing ---------------------------------------------------------------------------
_TAG = re.compile(r"<[^>]+>")
_URL = re.compile(r"https?://\S+|www\.\S+")
_ISBN = re.compile(r"\bISBN(?:[\s-]*1[03])?\s*(?:of|:)?\s*[\dXx][\dXx-]{8,16}", re.IGNORECASE)
_PRODUCT_CODE = re.compile(rf"\b(?=[\w-]*\d)[\w-]{{{config.MIN_WORD_CHARS_WITH_DIGIT},}}\b")
# A product code lies inside one run of [\w-] characters holding a digit, and \b at a run's edges
# only depends on the run: so it is enough to look inside such runs, long enough ones only.
_CODE_RUN = re.compile(rf"(?<![\w-])(?=[\w-]{{{config.MIN_WORD_CHARS_WITH_DIGIT}}})[\w-]*\d[\w-]*")
_DOLLAR_AMOUNT = re.compile(r"(?:US)?\$\s?\d[\d,]*(?:\.\d+)?")
_BOILERPLATE = re.compile(r"Bio from Wikipedia, the free encyclopedia\.?|Read more|See all formats and editions",
                          re.IGNORECASE)
_SPACES = re.compile(r"[ \t\u00a0\u200b]{2,}|[\t\u00a0\u200b]")  # runs, and single non-space blanks
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([,.;:!?])")
_NEWLINES = re.compile(r"\s*\n\s*")
_REPEATED_PUNCTUATION = re.compile(r"([!?.,;:*=_~-])\1{2,}")
_NOT_WORD = re.compile(r"[\W_]+")
_AUTHOR_REPR = re.compile(  # the author field as a printed Python dict: its name
    r"""\{'avatar': (?:'[^'\\]*'|"[^"\\]*"|None), 'name': (?:'([^'\\]*)'|"([^"\\]*)"), 'about': """)
_DIGIT = re.compile(r"\d")
_ODD_BLANKS = ("\t", "\u00a0", "\u200b")
_REPEATABLE = tuple(mark * 3 for mark in "!?.,;:*=_~-")  # what _REPEATED_PUNCTUATION needs
_SPACED_PUNCTUATION = tuple(f" {mark}" for mark in ",.;:!?")  # what _SPACE_BEFORE_PUNCTUATION needs
# Case-insensitive patterns cannot use a fast literal search, so each runs only when its words occur:
# ``_folded`` lowercases as ``re.IGNORECASE`` matches (it also equates dotless i, dotted I and long s).
_FOLD = {"\u0131": "i", "\u0130": "i", "\u017f": "s"}
_BOILERPLATE_WORDS = ("bio from wikipedia", "read more", "see all formats and editions")


def _folded(text: str) -> str:
    if not text.isascii():
        for odd, letter in _FOLD.items():
            text = text.replace(odd, letter)
    return text.lower()


def scrub(text: str) -> str:
    """Clean text for a prompt: markup, URLs, ISBNs, product codes and dollar amounts out.

    A "product code" is any word of 7+ characters that holds a digit (ASINs, ISBNs, SKUs):
    it costs tokens and says nothing a reader could price. Dollar amounts ("list price
    $29.99") would hand the answer to every model, so they go too. Each pattern runs only
    where the characters it needs occur, and only on the part of the text where it can match
    (the result is the same as running every pattern on the whole text, several times faster).
    """
    if "<" in text:
        text = _TAG.sub(" ", text)
    text = html.unescape(text)
    if "http" in text or "www." in text:
        text = _URL.sub(" ", text)
    if "isbn" in _folded(text):
        text = _ISBN.sub(" ", text)
    if _DIGIT.search(text):
        text = _CODE_RUN.sub(lambda run: _PRODUCT_CODE.sub(" ", run.group()), text)
    if "$" in text:
        text = _DOLLAR_AMOUNT.sub(" ", text)
    folded = _folded(text)
    starts = [start for start in map(folded.find, _BOILERPLATE_WORDS) if start >= 0]
    if starts:  # no match can begin before the first of its words (folding keeps positions)
        first = min(starts) if len(folded) == len(text) else 0
        text = text[:first] + _BOILERPLATE.sub(" ", text[first:])
    if any(marks in text for marks in _REPEATABLE):
        text = _REPEATED_PUNCTUATION.sub(r"\1", text)
    if any(blank in text for blank in _ODD_BLANKS):
        text = _SPACES.sub(" ", text)
    else:
        while "  " in text:
            text = text.replace("  ", " ")
    if any(spaced in text for spaced in _SPACED_PUNCTUATION):
        text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    return (_NEWLINES.sub("\n", text) if "\n" in text else text).strip()


# --- details: a JSON object string on the hub, an English sentence in the shipped sample ---
FORMATS = ("hardcover", "paperback", "mass market", "kindle", "audio", "board book", "spiral", "other")
USEFUL_DETAIL_KEYS = ("Publisher", "Language", "Print length", "Reading age", "Grade level", "Edition")


def _first_number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text, re.IGNORECASE)
    return float(match.group(1).replace(",", "")) if match else None


def book_format(*texts: str) -> str:
    """The binding named first in ``texts`` (subtitle, details, store), or ``"other"``."""
    joined = " ".join(texts).lower()
    found = [(joined.find(name), name) for name in FORMATS[:-1] if name in joined]
    return min(found)[1] if found else "other"


def parse_details(details: object) -> dict[str, object]:
    """Publisher, language, pages, weight (oz) and year from the ``details`` field.

    The hub stores a JSON object string; the shipped excerpt an English sentence: both work.
    """
    text = details if isinstance(details, str) else json.dumps(details or {})
    try:
        table = json.loads(text)
    except json.JSONDecodeError:
        table = None
    if isinstance(table, dict):
        table = {str(k).strip(): str(v) for k, v in table.items() if v not in (None, "")}
        flat = " ".join(f"{k}: {v}." for k, v in table.items())
        publisher = table.get("Publisher", "").split(";")[0].split("(")[0].strip() or None
        language = table.get("Language")
        useful = {k: table[k] for k in USEFUL_DETAIL_KEYS if k in table}
    else:
        flat = text
        match = re.search(r"published by (.+?)(?:,? (?:in|on|as|and is|and was) |, (?=[a-z])|\.(?= [a-z])|\.$|;|\. )",
                          text, re.IGNORECASE)
        publisher = match.group(1).strip() if match else None
        match = re.search(r"\b(?:in|available in) (English|Spanish|French|German|Italian)\b", text)
        language = match.group(1) if match else None
        useful = {}
    pounds = _first_number(r"([\d.]+)\s*pounds", flat)
    year = _first_number(r"\b(1[5-9]\d\d|20[0-3]\d)\b", flat)
    return {
        "publisher": publisher,
        "language": language,
        "pages": _first_number(r"([\d,]+)\s*pages", flat),
        "weight_oz": pounds * 16 if pounds is not None else _first_number(r"([\d.]+)\s*ounces", flat),
        "year": year,
        "useful": useful,
        "flat": flat,
    }


def author_name(author: object, store: str | None) -> str | None:
    """The author's name from the stringified ``author`` dict, else from ``store``.

    The hub's strings are Python dict reprs (``{'avatar': ..., 'name': ..., 'about': [...]}``):
    a plain quoted name in that shape is read directly, without evaluating the long ``about``.
    """
    plain = _AUTHOR_REPR.match(author) if isinstance(author, str) and author.endswith("}") else None
    if plain:
        author = {"name": plain.group(1) or plain.group(2)}
    elif isinstance(author, str) and author.strip():
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(author)
                break
            except (ValueError, SyntaxError):
                value = None
        author = value
    if isinstance(author, dict) and author.get("name"):
        return str(author["name"])
    if store:
        name = store.split("(")[0].split("Format:")[0].strip(" ,")
        return name or None
    return None


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v]


@dataclass
class Item:
    """A curated book: its price, its prompt text (cut to MAX_TOKENS) and hand features."""

    asin: str
    title: str
    price: float
    text: str
    token_count: int
    category: str
    format: str
    pages: float
    weight_oz: float
    year: float
    rating_number: float
    average_rating: float
    description_chars: int

    @property
    def dollars(self) -> int:
        """The answer the LLM learns: the price rounded half up to whole dollars (1..999)."""
        return int(math.floor(self.price + 0.5))

    @property
    def test_prompt(self) -> str:
        """What a model sees: the question and the text, ending right where the price goes."""
        return f"{config.QUESTION}\n\n{self.text}\n\n{config.ANSWER_PREFIX}"

    @property
    def completion(self) -> str:
        """What a model is trained to write after :attr:`test_prompt`."""
        return f"{self.dollars}.00"

    @property
    def prompt(self) -> str:
        """The full training prompt: ``test_prompt + completion``."""
        return self.test_prompt + self.completion

    def to_row(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, object]) -> Item:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def prices(items: list[Item]) -> np.ndarray:
    """The true prices of ``items``, as floats."""
    return np.array([item.price for item in items], dtype=float)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def book_key(title: str, author: str | None) -> str:
    """One key per book, shared by its editions: normalised title and author (``""`` if no title)."""
    title = _NOT_WORD.sub(" ", title.lower()).strip()
    return f"{title}|{_NOT_WORD.sub(' ', (author or '').lower()).strip()}" if title else ""


def describe(record: dict[str, object]) -> dict[str, object]:
    """Everything but the token count for one raw record: scrubbed content and hand features."""
    return describe_book(record)[0]


def prompt_parts(record: dict[str, object]) -> dict[str, object]:
    """The parts of one raw record that its prompt and hand features are made of, before scrubbing: ``title``,
    ``subtitle`` (the binding, edition and date line), ``store``, ``details`` (:func:`parse_details`),
    ``categories`` (the path below "Books"), ``blurb`` (features, then description) and ``author``.

    Curation (:func:`describe_book`) and the demo's form (``helpers.demo.Book.from_record``) both read a record
    through this one function.
    """
    store = str(record.get("store") or "")
    return {
        "title": str(record.get("title") or ""),
        "subtitle": str(record.get("subtitle") or ""),
        "store": store,
        "details": parse_details(record.get("details")),
        "categories": [c for c in _as_list(record.get("categories")) if c != "Books"],
        "blurb": _as_list(record.get("features")) + _as_list(record.get("description")),
        "author": author_name(record.get("author"), store),
    }


def describe_book(record: dict[str, object]) -> tuple[dict[str, object], str]:
    """:func:`describe` and the record's :func:`book_key` (both need the author: parsed once).

    The content puts the facts that drive a price (format, author, category, publisher,
    pages) first, so they survive the cut to MAX_TOKENS; the blurb comes last.
    """
    parts = prompt_parts(record)
    title, subtitle = scrub(parts["title"]), scrub(parts["subtitle"])
    store, details, categories, blurb, author = (parts[name] for name in ("store", "details", "categories", "blurb",
                                                                           "author"))
    facts = [
        f"Author: {author}" if author else "",
        f"Category: {' > '.join(categories)}" if categories else "",
        f"Publisher: {details['publisher']}" if details["publisher"] else "",
        f"Pages: {details['pages']:.0f}" if details["pages"] else "",
        f"Language: {details['language']}" if details["language"] else "",
    ] + [f"{key}: {value}" for key, value in details["useful"].items()
         if key not in ("Publisher", "Language")]
    lines = [title, subtitle, *facts, " ".join(blurb)]
    year = details["year"] or _first_number(r"\b(1[5-9]\d\d|20[0-3]\d)\b", subtitle)
    return {
        "asin": str(record.get("parent_asin") or ""),
        "title": title,
        "content": "\n".join(scrub(line) for line in lines if line.strip()),
        "category": categories[0] if categories else "Unknown",
        "format": book_format(subtitle, details["flat"], store),
        "pages": details["pages"] if details["pages"] is not None else math.nan,
        "weight_oz": details["weight_oz"] if details["weight_oz"] is not None else math.nan,
        "year": year if year is not None else math.nan,
        "rating_number": _number(record.get("rating_number")),
        "average_rating": _number(record.get("average_rating")),
        "description_chars": sum(len(text) for text in blurb),
    }, book_key(title, author)

"""The demo page: type a book, get its price from the fine-tuned model and from the best classical baseline.

    python -m helpers.demo [--profile smoke] [--adapter FOLDER_OR_HUB_ID | --gguf PATH] [--port 7860] [--share]

The form asks for every part of the prompt curation writes (the title, the binding, edition and date line,
author, category path, publisher, pages, language, more details, the blurb); it becomes a raw record in the
hub's schema and goes through curation's own scrubbing and cut to MAX_TOKENS
(:func:`helpers.curate.item_from_record`), so the model reads exactly the prompt it was trained on
(``Item.test_prompt``): a real book typed in as its record holds it gets its training prompt, word for word
(tests/test_demo.py checks every kept book of the sample). The baseline reads the same Item's features, but
the form does not ask a book's weight, and takes its year from the subtitle only: for those two features (and
the blurb's length) a typed book may differ from its curated Item. The page shows the model's median price
with its 80% interval and its whole price distribution. ``--gguf`` serves a saved GGUF file (or a ``gguf-<type>``
folder) through llama.cpp instead (:mod:`helpers.llamacpp`; ``make gguf`` installs it): no torch model is
loaded, and the page, its prompt and its distribution are the same.
Gradio's analytics are off; a public share link (``--share``, ``SHARE`` in notebook 06) is opt-in.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage reports
import gradio as gr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from helpers import assets, config, llamacpp  # noqa: E402
from helpers.baselines import load_fitted  # noqa: E402
from helpers.curate import item_from_record  # noqa: E402
from helpers.data import parse_price  # noqa: E402
from helpers.dataset import load_curated  # noqa: E402
from helpers.hardware import Hardware  # noqa: E402
from helpers.items import FORMATS, USEFUL_DETAIL_KEYS, Item, book_format, describe, prompt_parts  # noqa: E402
from helpers.leaderboard import leaderboard  # noqa: E402
from helpers.models import finetuned_name, load_finetuned  # noqa: E402
from helpers.predict import PriceDistributions, llm_predictor  # noqa: E402
from helpers.pricing import Predictor  # noqa: E402
from helpers.tokens import KEPT  # noqa: E402

FALLBACK_BASELINE = "Gradient boosting (text + features)"  # when no baseline is on the leaderboard yet
MAX_PAGES = 20_000  # more pages than any book: an absurd input
EXAMPLES = 4  # real books from the shipped sample, offered under the form
API_NAME = "price"  # the endpoint gradio_client calls: Client(url).predict(..., api_name="/price")


LABELS = {"title": "Title", "subtitle": "Binding, edition and date", "author": "Author", "format": "Format",
          "pages": "Pages", "language": "Language", "category": "Category", "publisher": "Publisher",
          "details": "More details", "blurb": "Blurb"}  # each field of Book as the page labels it, in the page's order
DETAIL_KEYS = tuple(key for key in USEFUL_DETAIL_KEYS if key not in ("Publisher", "Language"))  # "More details"


@dataclass(frozen=True)
class Book:
    """What a learner types into the form: each field is one line of the prompt curation writes.

    ``subtitle`` is the line under the title on the book's page, its binding, edition and date ("Hardcover –
    International Edition, November 15, 2000"); None writes the format's name alone ("Paperback"). ``category``
    is the path below Books ("History > Asia"). ``details``: more lines of the store's details table, one
    ``Key: value`` a line (``Print length``, ``Reading age``, ``Grade level``, ``Edition``), as the hub's records
    hold them. ``format`` is also what the classical baseline reads; curation takes it from the subtitle first.
    """

    title: str
    author: str = ""
    format: str = "paperback"
    pages: float | None = None
    blurb: str = ""
    category: str = ""
    publisher: str = ""
    subtitle: str | None = None
    language: str = "English"
    details: str = ""

    def problem(self) -> str | None:
        """Why the form cannot be priced (empty, absurd or contradictory), or None."""
        if not any(character.isalnum() for character in self.title + self.blurb):
            return "Type at least a title or a blurb (words, not only punctuation): the model prices what it reads."
        if self.pages is not None and not 1 <= self.pages <= MAX_PAGES:
            return f"Pages must be between 1 and {MAX_PAGES:,} (or left empty), not {self.pages:g}."
        if self.format not in FORMATS:
            return f"Format must be one of {', '.join(FORMATS)}, not {self.format!r}."
        named = book_format(self.subtitle or "")
        if named not in ("other", self.format):
            return (f"The subtitle says {named} but Format says {self.format}: make them agree (curation reads the "
                    f"binding from the subtitle first).")
        for line in self.details.splitlines():
            key, colon, value = line.partition(":")
            if line.strip() and (not colon or key.strip() not in DETAIL_KEYS or not value.strip()):
                return (f"More details takes one 'Key: value' a line, the keys among {', '.join(DETAIL_KEYS)}; "
                        f"not {line.strip()!r}.")
        return None

    def record(self) -> dict[str, object]:
        """The book as a raw record in the hub's schema (what curation reads): its details a JSON object whose
        only keys that reach the prompt are Publisher, Language and the ``details`` lines; ``Format`` and
        ``Pages`` are read from it as curation reads the hub's, without a line of their own."""
        details = {"Format": self.format.title()} if self.format != "other" else {}  # after the subtitle's binding
        if self.pages:
            details["Pages"] = f"{self.pages:.0f} pages"  # the first "N pages" of the details: Pages: N
        details |= {key: value for key, value in (("Publisher", self.publisher.strip()),
                                                  ("Language", self.language.strip())) if value}
        for line in self.details.splitlines():
            key, _, value = line.partition(":")
            if key.strip() and value.strip():
                details[key.strip()] = value.strip()
        subtitle = self.format.title() if self.subtitle is None and self.format != "other" else self.subtitle or ""
        return {
            "title": self.title.strip(),
            "subtitle": subtitle.strip(),
            "author": json.dumps({"name": self.author.strip()}) if self.author.strip() else None,
            "store": "",
            "details": json.dumps(details),
            "categories": ["Books", *(part.strip() for part in self.category.split(">") if part.strip())],
            "features": [],
            "description": [self.blurb.strip()] if self.blurb.strip() else [],
        }

    def markdown(self, width: int = 90) -> str:
        """The form as filled in, a field a row, as the page labels them (long values cut to ``width``
        characters)."""
        def shown(value: object) -> str:
            text = "" if value is None else f"{value:.0f}" if isinstance(value, float) else str(value)
            text = " · ".join(text.splitlines()).replace("|", "\\|")
            return text if len(text) <= width else text[: width - 1].rstrip() + "…"
        subtitle = self.record()["subtitle"]  # None shows the format's name, as the prompt has it
        rows = [f"| {label} | {shown(subtitle if name == 'subtitle' else getattr(self, name))} |"
                for name, label in LABELS.items()]
        return "\n".join(["| field | typed into the form |", "|---|---|", *rows])

    def item(self, tokenizer: PreTrainedTokenizerFast) -> tuple[Item, str]:
        """The :class:`Item` curation makes of :meth:`record`, and its skip reason (``""``: curation would keep
        it): the text the model reads is ``item.test_prompt``."""
        return item_from_record(self.record(), tokenizer)

    @classmethod
    def from_record(cls, record: dict[str, object]) -> Book:
        """A raw record (a real book from the sample or the hub) as the form would hold it: every part of its
        prompt, read by curation's own :func:`helpers.items.prompt_parts`."""
        parts = prompt_parts(record)
        details = parts["details"]
        return cls(
            title=parts["title"], author=parts["author"] or "", format=describe(record)["format"],
            pages=details["pages"], blurb=" ".join(parts["blurb"]), category=" > ".join(parts["categories"]),
            publisher=details["publisher"] or "", subtitle=parts["subtitle"], language=details["language"] or "",
            details="\n".join(f"{key}: {value}" for key, value in details["useful"].items() if key in DETAIL_KEYS),
        )


@dataclass
class Quote:
    """The prices of one book: the fine-tuned model's (with its distribution, if it gives one) and the baseline's."""

    item: Item
    skip_reason: str  # why curation would not have kept the book ("" if it would)
    model_name: str
    price: float | None
    distribution: PriceDistributions | None
    baseline_name: str
    baseline_price: float

    def markdown(self, truth: float | None = None) -> str:
        """The answer as the page shows it: the price and interval, whose price it is, the baseline's, any note;
        and, given the book's true price (``truth``), that price and each model's error."""
        if self.price is None:
            headline = "The model gave no price for this book (no number in its answer)."
        else:
            headline = f"### ${self.price:,.0f}"
            if self.distribution is not None:
                low, high = (bound[0] for bound in self.distribution.interval(config.INTERVAL_LEVEL))
                headline += f" &nbsp;·&nbsp; {config.INTERVAL_LEVEL:.0%} interval ${low:,.0f} to ${high:,.0f}"
        lines = [headline, f"**{self.model_name}**" + (", the median of its price distribution"
                                                        if self.distribution is not None else ""),
                 "", f"Best classical baseline, **{self.baseline_name}**: ${self.baseline_price:,.0f}"]
        if truth is not None:
            errors = [f"{name} ${abs(price - truth):,.2f}" for name, price in (("the model", self.price),
                      ("the baseline", self.baseline_price)) if price is not None]
            lines += ["", f"True price: **${truth:,.2f}** (off by {' and '.join(errors)})"]
        if self.skip_reason:
            lines += ["", f"> Note: curation would have skipped this book ({self.skip_reason}: "
                          f"{self.item.token_count} tokens; training books have {config.MIN_TOKENS + 1}-"
                          f"{config.MAX_TOKENS}). Paste the whole blurb for a price the model can stand behind."]
        return "\n".join(lines)

    def plot(self, truth: float | None = None) -> Figure | None:
        """The model's price distribution for the book, with its true price if given (None for a predictor that
        gives one price)."""
        return self.distribution.plot(0, truth=truth) if self.distribution is not None else None


class Pricer:
    """The fine-tuned model and the best classical baseline of a profile, ready to price typed-in books."""

    def __init__(self, profile: config.Profile, adapter: str | Path | None, hardware: Hardware,
                 gguf: Path | None = None) -> None:
        """``gguf``: a GGUF file (or a folder holding ``model.gguf``) to serve through llama.cpp instead of the
        4-bit model with its adapter."""
        self.profile = profile
        self.tokenizer = assets.load_tokenizer(profile.tokenizer_source)  # curation's tokenizer: the same cut
        if gguf is not None:
            engine = llamacpp.Engine(llamacpp.gguf_file(gguf))
            self.model_name, self.predictor = llamacpp.describe(engine), llamacpp.predictor(engine)
        else:
            model, tokenizer = load_finetuned(profile, adapter, hardware)
            self.model_name = finetuned_name(model, profile, adapter)
            self.predictor = llm_predictor(model, tokenizer, profile)
        self.baseline_name = leaderboard(profile).reference() or FALLBACK_BASELINE
        self.baseline: Predictor = load_fitted(self.baseline_name, profile)

    def quote(self, book: Book) -> Quote:
        """Price ``book`` (check :meth:`Book.problem` first)."""
        item, reason = book.item(self.tokenizer)
        prices = self.predictor([item])
        distribution = prices if isinstance(prices, PriceDistributions) else None
        return Quote(item, "" if reason == KEPT else reason, self.model_name, prices[0], distribution,
                     self.baseline_name, float(self.baseline([item])[0]))


@dataclass(frozen=True)
class SampleBook:
    """A real book of the shipped sample, as the form holds it, with its true price."""

    book: Book
    price: float
    test: bool  # one of the profile's test books: no model of the profile was trained on it


def sample_books(profile: config.Profile) -> list[SampleBook]:
    """The books of the shipped sample that have a blurb and a price, the profile's test books first."""
    try:
        test = {item.asin for item in load_curated(profile)[1]}
    except FileNotFoundError:
        test = set()
    books = []
    for line in config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        price, _ = parse_price(record.get("price"))
        if price is not None and (record.get("description") or record.get("features")):
            books.append(SampleBook(Book.from_record(record), price, record.get("parent_asin") in test))
    return sorted(books, key=lambda sample: not sample.test)


def examples(profile: config.Profile, count: int = EXAMPLES) -> list[Book]:
    """Real books from the shipped sample for the form's examples: the profile's test books first."""
    return [sample.book for sample in sample_books(profile)[:count]]


def form_values(book: Book) -> list[object]:
    """The form's fields for ``book``, in the order of the page's inputs and of its API (``Book``'s fields)."""
    return [getattr(book, field.name) for field in fields(Book)]


def build(pricer: Pricer) -> gr.Blocks:
    """The page: the form, the prices, the distribution, and the prompt the model read. Its API endpoint
    (``/price``) takes the fields of :class:`Book`, in order (:func:`form_values`)."""
    def price(title: str, author: str, book_format: str, pages: float | None, blurb: str, category: str,
              publisher: str, subtitle: str, language: str, details: str) -> tuple[str, Figure | None, str]:
        book = Book(title or "", author or "", book_format or "other", pages, blurb or "", category or "",
                    publisher or "", subtitle or "", language or "", details or "")
        problem = book.problem()
        if problem:
            return f"**Cannot price this yet.** {problem}", None, ""
        quote = pricer.quote(book)
        return quote.markdown(), quote.plot(), quote.item.test_prompt

    def name_binding(picked: str, subtitle: str) -> str:
        """A subtitle that is only a binding's name (or empty) follows the Format picked."""
        bare = {name.title() for name in FORMATS[:-1]} | {""}
        return (picked.title() if picked in FORMATS[:-1] else "") if subtitle.strip() in bare else subtitle

    def pick_binding(subtitle: str, picked: str) -> str:
        """The Format follows the binding a typed subtitle names first, as curation reads it."""
        named = book_format(subtitle)
        return picked if named == "other" else named

    with gr.Blocks(title="Book Pricer", analytics_enabled=False) as page:
        gr.Markdown(f"# Book Pricer\nType a book; **{pricer.model_name}** (profile `{pricer.profile.name}`) prices "
                    f"it from what you write, next to the best classical baseline. Prices are whole dollars. Each "
                    f"field is one line of the prompt the model was trained on: fill what the book's page shows.")
        with gr.Row():
            with gr.Column():
                title = gr.Textbox(label=LABELS["title"])
                subtitle = gr.Textbox(label=LABELS["subtitle"], value="Paperback",
                                      placeholder="e.g. Hardcover – International Edition, November 15, 2000")
                author = gr.Textbox(label=LABELS["author"])
                with gr.Row():
                    binding = gr.Dropdown(list(FORMATS), value="paperback", label=LABELS["format"])
                    pages = gr.Number(label=LABELS["pages"], precision=0)
                    language = gr.Textbox(label=LABELS["language"], value="English")
                with gr.Row():
                    category = gr.Textbox(label=LABELS["category"], placeholder="e.g. History > Asia")
                    publisher = gr.Textbox(label=LABELS["publisher"])
                details = gr.Textbox(label=LABELS["details"], lines=2,
                                     placeholder=f"One 'Key: value' a line, keys among {', '.join(DETAIL_KEYS)}")
                blurb = gr.Textbox(label=LABELS["blurb"], lines=6, placeholder="The description from the book's page")
                button = gr.Button("Price it", variant="primary")
            with gr.Column():
                answer = gr.Markdown(label="Price")
                chart = gr.Plot(label="Price distribution")
                with gr.Accordion("What the model read", open=False):
                    prompt = gr.Textbox(label="Prompt", lines=8, show_label=False)
        boxes = {"title": title, "author": author, "format": binding, "pages": pages, "blurb": blurb,
                 "category": category, "publisher": publisher, "subtitle": subtitle, "language": language,
                 "details": details}
        inputs = [boxes[field.name] for field in fields(Book)]
        binding.input(name_binding, [binding, subtitle], subtitle, api_name=False)
        subtitle.input(pick_binding, [subtitle, binding], binding, api_name=False)
        gr.Examples([form_values(book) for book in examples(pricer.profile)], inputs,
                    label="Real books from the sample")
        button.click(price, inputs, [answer, chart, prompt], api_name=API_NAME)
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--adapter", default=None,
                        help="a trained adapter's folder or hub id (default: the profile's run)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="serve this GGUF file (or gguf-<type> folder) through llama.cpp instead (make gguf)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    parser.add_argument("--share", action="store_true", help="also open a public link through Gradio's servers")
    args = parser.parse_args(argv)
    if args.gguf and args.adapter:
        parser.error("--gguf serves a saved GGUF file: it does not go with --adapter (its adapter is merged in)")
    if args.gguf and not llamacpp.gguf_file(args.gguf).is_file():
        parser.error(f"no GGUF file at {llamacpp.gguf_file(args.gguf)}: write one first (make gguf, or notebook 07)")
    if args.gguf and not llamacpp.installed():
        parser.error(f"--gguf needs llama.cpp, which is not installed here: {llamacpp.INSTALL}")
    page = build(Pricer(config.get_profile(args.profile), args.adapter, Hardware.detect(), args.gguf))
    page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()

"""The demo page: type a book, get its price from the fine-tuned model and from the best classical baseline.

    python -m helpers.demo [--profile smoke] [--adapter FOLDER_OR_HUB_ID] [--port 7860] [--share]

The form becomes a raw record in the hub's schema and goes through curation's own scrubbing and
cut to MAX_TOKENS (:func:`helpers.curate.item_from_record`), so the model reads exactly the prompt
it was trained on (``Item.test_prompt``), and the baseline exactly the Item it was fitted on. The
page shows the model's median price with its 80% interval and its whole price distribution.
Gradio's analytics are off; a public share link (``--share``, ``SHARE`` in notebook 06) is opt-in.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage reports
import gradio as gr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from helpers import assets, config  # noqa: E402
from helpers.baselines import load_fitted  # noqa: E402
from helpers.curate import item_from_record  # noqa: E402
from helpers.dataset import load_curated  # noqa: E402
from helpers.hardware import Hardware  # noqa: E402
from helpers.items import FORMATS, Item, author_name, book_format, parse_details  # noqa: E402
from helpers.leaderboard import leaderboard  # noqa: E402
from helpers.models import finetuned_name, load_finetuned  # noqa: E402
from helpers.predict import PriceDistributions, llm_predictor  # noqa: E402
from helpers.pricing import Predictor  # noqa: E402
from helpers.tokens import KEPT  # noqa: E402

FALLBACK_BASELINE = "Gradient boosting (text + features)"  # when no baseline is on the leaderboard yet
MAX_PAGES = 20_000  # more pages than any book: an absurd input
EXAMPLES = 4  # real books from the shipped sample, offered under the form
API_NAME = "price"  # the endpoint gradio_client calls: Client(url).predict(..., api_name="/price")


@dataclass(frozen=True)
class Book:
    """What a learner types into the form."""

    title: str
    author: str = ""
    format: str = "paperback"
    pages: float | None = None
    blurb: str = ""
    category: str = ""
    publisher: str = ""

    def problem(self) -> str | None:
        """Why the form cannot be priced (empty, or absurd), or None."""
        if not any(character.isalnum() for character in self.title + self.blurb):
            return "Type at least a title or a blurb (words, not only punctuation): the model prices what it reads."
        if self.pages is not None and not 1 <= self.pages <= MAX_PAGES:
            return f"Pages must be between 1 and {MAX_PAGES:,} (or left empty), not {self.pages:g}."
        if self.format not in FORMATS:
            return f"Format must be one of {', '.join(FORMATS)}, not {self.format!r}."
        return None

    def record(self) -> dict[str, object]:
        """The book as a raw record in the hub's schema (what curation reads)."""
        details = {"Publisher": self.publisher.strip()} if self.publisher.strip() else {}
        if self.pages:
            details["Print length"] = f"{self.pages:.0f} pages"
        return {
            "title": self.title.strip(),
            "subtitle": self.format.title() if self.format != "other" else "",
            "author": json.dumps({"name": self.author.strip()}) if self.author.strip() else None,
            "store": "",
            "details": json.dumps(details),
            "categories": ["Books", self.category.strip()] if self.category.strip() else ["Books"],
            "features": [],
            "description": [self.blurb.strip()] if self.blurb.strip() else [],
        }

    @classmethod
    def from_record(cls, record: dict[str, object]) -> Book:
        """A raw record (a real book from the sample) as the form would hold it."""
        details = parse_details(record.get("details"))
        categories = [c for c in record.get("categories") or [] if c != "Books"]
        return cls(
            title=str(record.get("title") or ""), author=author_name(record.get("author"), record.get("store")) or "",
            format=book_format(str(record.get("subtitle") or ""), details["flat"], str(record.get("store") or "")),
            pages=details["pages"],
            blurb=" ".join([*(record.get("features") or []), *(record.get("description") or [])]),
            category=categories[0] if categories else "", publisher=details["publisher"] or "",
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

    def markdown(self) -> str:
        """The answer as the page shows it: the price and interval, whose price it is, the baseline's, any note."""
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
        if self.skip_reason:
            lines += ["", f"> Note: curation would have skipped this book ({self.skip_reason}: "
                          f"{self.item.token_count} tokens; training books have {config.MIN_TOKENS + 1}-"
                          f"{config.MAX_TOKENS}). Paste the whole blurb for a price the model can stand behind."]
        return "\n".join(lines)

    def plot(self) -> Figure | None:
        """The model's price distribution for the book (None for a predictor that gives one price)."""
        return self.distribution.plot(0) if self.distribution is not None else None


class Pricer:
    """The fine-tuned model and the best classical baseline of a profile, ready to price typed-in books."""

    def __init__(self, profile: config.Profile, adapter: str | Path | None, hardware: Hardware) -> None:
        self.profile = profile
        self.tokenizer = assets.load_tokenizer(profile.tokenizer_source)  # curation's tokenizer: the same cut
        model, tokenizer = load_finetuned(profile, adapter, hardware)
        self.model_name = finetuned_name(model, profile, adapter)
        self.predictor = llm_predictor(model, tokenizer, profile)
        self.baseline_name = leaderboard(profile).reference() or FALLBACK_BASELINE
        self.baseline: Predictor = load_fitted(self.baseline_name, profile)

    def quote(self, book: Book) -> Quote:
        """Price ``book`` (check :meth:`Book.problem` first)."""
        item, reason = item_from_record(book.record(), self.tokenizer)
        prices = self.predictor([item])
        distribution = prices if isinstance(prices, PriceDistributions) else None
        return Quote(item, "" if reason == KEPT else reason, self.model_name, prices[0], distribution,
                     self.baseline_name, float(self.baseline([item])[0]))


def examples(profile: config.Profile, count: int = EXAMPLES) -> list[Book]:
    """Real books from the shipped sample for the form's examples: the profile's test books first."""
    records = [json.loads(line) for line in config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    records = [record for record in records if record.get("description") or record.get("features")]
    try:
        test = {item.asin for item in load_curated(profile)[1]}
    except FileNotFoundError:
        test = set()
    records.sort(key=lambda record: record.get("parent_asin") not in test)
    return [Book.from_record(record) for record in records[:count]]


def build(pricer: Pricer) -> gr.Blocks:
    """The page: the form, the prices, the distribution, and the prompt the model read."""
    def price(title: str, author: str, book_format: str, pages: float | None, blurb: str, category: str,
              publisher: str) -> tuple[str, Figure | None, str]:
        book = Book(title or "", author or "", book_format or "other", pages, blurb or "", category or "",
                    publisher or "")
        problem = book.problem()
        if problem:
            return f"**Cannot price this yet.** {problem}", None, ""
        quote = pricer.quote(book)
        return quote.markdown(), quote.plot(), quote.item.test_prompt

    with gr.Blocks(title="Book Pricer", analytics_enabled=False) as page:
        gr.Markdown(f"# Book Pricer\nType a book; **{pricer.model_name}** (profile `{pricer.profile.name}`) prices "
                    f"it from what you write, next to the best classical baseline. Prices are whole dollars.")
        with gr.Row():
            with gr.Column():
                title = gr.Textbox(label="Title")
                author = gr.Textbox(label="Author")
                with gr.Row():
                    book_format = gr.Dropdown(list(FORMATS), value="paperback", label="Format")
                    pages = gr.Number(label="Pages", precision=0)
                with gr.Row():
                    category = gr.Textbox(label="Category", placeholder="e.g. Science & Math")
                    publisher = gr.Textbox(label="Publisher")
                blurb = gr.Textbox(label="Blurb", lines=6, placeholder="The description from the back cover")
                button = gr.Button("Price it", variant="primary")
            with gr.Column():
                answer = gr.Markdown(label="Price")
                chart = gr.Plot(label="Price distribution")
                with gr.Accordion("What the model read", open=False):
                    prompt = gr.Textbox(label="Prompt", lines=8, show_label=False)
        inputs = [title, author, book_format, pages, blurb, category, publisher]
        gr.Examples([[book.title, book.author, book.format, book.pages, book.blurb, book.category, book.publisher]
                     for book in examples(pricer.profile)], inputs, label="Real books from the sample")
        button.click(price, inputs, [answer, chart, prompt], api_name=API_NAME)
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None,
                        help=f"default: ${config.PROFILE_ENV} or smoke")
    parser.add_argument("--adapter", default=None,
                        help="a trained adapter's folder or hub id (default: the profile's run)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    parser.add_argument("--share", action="store_true", help="also open a public link through Gradio's servers")
    args = parser.parse_args(argv)
    page = build(Pricer(config.get_profile(args.profile), args.adapter, Hardware.detect()))
    page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()

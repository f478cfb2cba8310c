"""Open the demo page in headless Chromium, fill the form with a real test book, price it, save a screenshot.

    make demo-check            # installs Playwright's Python driver, needs Debian's chromium
    python scripts/demo_check.py [--profile smoke] [--out results/smoke/demo.png]

It drives Debian's own Chromium (``$CHROMIUM``, default /usr/bin/chromium) through Playwright, so no
browser is downloaded. The profile's run must exist (``make smoke``, or notebook 04). Look at the
picture: the price, its interval, the baseline's price and the distribution should all be there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from helpers import config
from helpers.demo import Pricer, build, examples
from helpers.hardware import Hardware

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 300_000  # the first price on a busy 2-core CPU takes a while


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        sys.exit("No Chromium found: install Debian's (sudo apt-get install chromium) or set CHROMIUM to a browser.")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<profile>/demo.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    profile = config.get_profile(args.profile)
    out = args.out or profile.results_dir / "demo.png"
    pricer = Pricer(profile, None, Hardware.detect())
    book = examples(profile)[0]
    page = build(pricer)
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.goto(page.local_url)
            tab.get_by_label("Title").fill(book.title)
            tab.get_by_label("Author").fill(book.author)
            tab.get_by_label("Format").fill(book.format)
            tab.keyboard.press("Enter")
            tab.get_by_label("Binding, edition and date").fill(book.subtitle or "")  # after Format: as typed
            tab.get_by_label("Pages").fill(f"{book.pages:.0f}" if book.pages else "")
            tab.get_by_label("Language").fill(book.language)
            tab.get_by_label("Category").fill(book.category)
            tab.get_by_label("Publisher").fill(book.publisher)
            tab.get_by_label("More details").fill(book.details)
            tab.get_by_label("Blurb").fill(book.blurb)
            started = time.perf_counter()
            tab.get_by_role("button", name="Price it").click()
            tab.get_by_text("interval $").wait_for(timeout=ANSWER_TIMEOUT_MS)
            tab.wait_for_timeout(1_000)  # let the plot draw
            out.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(out), full_page=True)
            print(f"Priced {book.title!r} in {time.perf_counter() - started:.1f} s; screenshot: {out}")
            browser.close()
    finally:
        page.close()


if __name__ == "__main__":
    main()

"""Curation speed: the batched token counter against a naive one-item-at-a-time loop.

Both count the Llama 3.1 tokens of the same scrubbed contents and cut kept texts to 160
tokens. The naive loop tokenises each full text with its own call; the pipeline's
``count_and_cut_batch`` tokenises capped texts only, with tiktoken for Meta's Llama 3 BPE
(identical ids) and decodes the kept cuts in one Rust call per batch. One process: the
full curation runs one such process per core. The 179 real sample records are repeated to
make a workload of a useful size. Run: ``python benchmarks/bench_curation.py [--copies N]``.
"""

from __future__ import annotations

import argparse
import json
import time

from helpers import config
from helpers.assets import llama3_tokenizer_offline
from helpers.items import describe
from helpers.tokens import KEPT, count_and_cut_batch


def naive(contents: list[str], tokenizer) -> list[int]:
    counts = []
    for content in contents:
        ids = tokenizer.encode(content, add_special_tokens=False)
        tokenizer.decode(ids[: config.MAX_TOKENS])
        counts.append(len(ids))
    return counts


def batched(contents: list[str], tokenizer, batch_size: int) -> list[int]:
    counts = []
    for start in range(0, len(contents), batch_size):
        chunk = contents[start : start + batch_size]
        counts += count_and_cut_batch({"content": chunk, "skip_reason": [KEPT] * len(chunk)},
                                      tokenizer)["token_count"]
    return counts


def items_per_second(run, repeats: int) -> tuple[float, list[int]]:
    """Best rate of ``repeats`` runs (the least disturbed by other work on the machine)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = max(best, len(result) / (time.perf_counter() - started))
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="repeats of the 179-record sample")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--batch-size", type=int, default=config.get_profile("full").batch_size)
    args = parser.parse_args()
    records = [json.loads(line) for line in config.SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    contents = [describe(record)["content"] for record in records] * args.copies
    tokenizer = llama3_tokenizer_offline()
    tokenizer.encode("warm up")

    naive_rate, naive_counts = items_per_second(lambda: naive(contents, tokenizer), args.repeats)
    batched_rate, batched_counts = items_per_second(lambda: batched(contents, tokenizer, args.batch_size),
                                                    args.repeats)
    same = all((a > config.MIN_TOKENS) == (b > config.MIN_TOKENS) for a, b in zip(naive_counts, batched_counts))
    print(f"best of {args.repeats} runs each; {len(contents):,} items (the 179 real sample records x {args.copies}), "
          f"mean {sum(map(len, contents)) / len(contents):,.0f} characters")
    print(f"naive, one item at a time : {naive_rate:10,.0f} items/s")
    print(f"batched pipeline          : {batched_rate:10,.0f} items/s  (batch {args.batch_size})")
    print(f"ratio batched / naive     : {batched_rate / naive_rate:10.1f}x")
    print(f"same keep/drop decisions  : {same}")


if __name__ == "__main__":
    main()

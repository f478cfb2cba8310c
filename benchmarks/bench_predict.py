"""Price reading speed: one forward pass over number tokens against greedy generation.

``NumberTokenPredictor`` reads the next-token distribution over the 999 single-token numbers
of the Llama 3.1 tokenizer in ONE forward pass per batch; ``GeneratePredictor`` generates a
few tokens and parses them. Both run on the same model and the same test books.

Offline there is no Llama 3.1 model (the hub is out of reach and SmolLM2 splits digits), so
this benchmark trains a TINY random-init ``LlamaForCausalLM`` with the real Llama 3.1
tokenizer for a few seconds on the curated smoke training prompts, the loss on the answer
tokens only. Its MAE compares the two *decoders* on one model; it says nothing about how
well a real LLM prices books. Run: ``python benchmarks/bench_predict.py [--epochs N]``
(needs ``python -m helpers.curate`` first).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from helpers import config
from helpers.assets import llama3_tokenizer_offline
from helpers.curate import load_curated
from helpers.evaluate import Evaluation, eval_items, evaluate
from helpers.items import Item
from helpers.predict import GeneratePredictor, NumberTokenPredictor

ANSWER_TOKENS = 4  # "21" "." "00" <end_of_text>: every answer is four Llama 3.1 tokens


def tiny_llama(vocab_size: int, pad_token_id: int) -> LlamaForCausalLM:
    torch.manual_seed(config.SEED)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id, tie_word_embeddings=True,
    ))


def train_on_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, items: list[Item],
                     epochs: int, batch_size: int, learning_rate: float) -> list[float]:
    """Teach ``model`` the answers: cross-entropy on the last four tokens of left-padded examples."""
    texts = [item.prompt + tokenizer.eos_token for item in items]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(config.SEED)
    epoch_losses = []
    model.train()
    for _ in range(epochs):
        losses = []
        for batch in torch.randperm(len(texts), generator=generator).split(batch_size):
            inputs = tokenizer([texts[index] for index in batch], padding=True, padding_side="left",
                               return_tensors="pt")
            logits = model(**inputs, logits_to_keep=ANSWER_TOKENS + 1).logits[:, :-1]
            targets = inputs["input_ids"][:, -ANSWER_TOKENS:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    model.eval()
    return epoch_losses


def timed(name: str, predictor, items: list[Item], repeats: int) -> tuple[Evaluation, float]:
    """The harness's evaluation of ``predictor`` and its best items-per-second of ``repeats`` runs."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        evaluation = evaluate(name, predictor, items, batched=True)
        best = max(best, len(items) / (time.perf_counter() - started))
    return evaluation, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default="smoke")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each decoder; the best counts")
    args = parser.parse_args()
    profile = config.get_profile(args.profile)
    train, test = load_curated(profile)
    items = eval_items(test, profile)
    tokenizer = llama3_tokenizer_offline()
    answer = tokenizer(items[0].completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert len(answer) == ANSWER_TOKENS, f"expected {ANSWER_TOKENS} answer tokens, got {len(answer)}"

    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
    started = time.perf_counter()
    losses = train_on_answers(model, tokenizer, train, args.epochs, profile.predict_batch_size, args.learning_rate)
    print(f"Stand-in model: a tiny random-init Llama ({model.num_parameters() / 1e6:.1f}M parameters, "
          f"Llama 3.1 tokenizer) trained {time.perf_counter() - started:.0f} s on {len(train)} smoke "
          f"training prompts; answer loss {losses[0]:.2f} -> {losses[-1]:.2f}.")
    print("Its MAE compares the two decoders on one model, not the quality of a real LLM.\n")

    number = NumberTokenPredictor(model, tokenizer, profile.predict_batch_size)
    generate = GeneratePredictor(model, tokenizer, profile.predict_batch_size)
    generate_one = GeneratePredictor(model, tokenizer, batch_size=1)
    for predictor in (number, generate):  # warm-up: first-call allocations are not what we measure
        predictor(items[:2])
    expected, number_rate = timed("NumberTokenPredictor (expected)", number.expected, items, args.repeats)
    argmax = evaluate("NumberTokenPredictor (argmax)", number.argmax, items, batched=True)  # same speed
    generated, generate_rate = timed("GeneratePredictor (greedy)", generate, items, args.repeats)
    one_by_one, one_rate = timed("GeneratePredictor, batch size 1", generate_one, items, args.repeats)

    print(f"{'decoder':<36}{'items/s':>10}{'MAE $':>10}{'failed':>8}")
    rows = ((expected, number_rate), (argmax, number_rate), (generated, generate_rate), (one_by_one, one_rate))
    for evaluation, rate in rows:
        metrics = evaluation.metrics
        print(f"{evaluation.name:<36}{rate:>10.1f}{metrics['mae']:>10.2f}{metrics['n_failed']:>8}")
    print(f"\nOn the same {len(items)} books, best of {args.repeats} runs each, one forward pass is "
          f"{number_rate / generate_rate:.1f}x faster than batched generation (batch size "
          f"{profile.predict_batch_size}) and {number_rate / one_rate:.1f}x faster than generating one book "
          "at a time. Argmax and expected price come from the same single pass.")


if __name__ == "__main__":
    main()

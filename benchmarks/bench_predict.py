"""Price reading speed and MAE: the price distribution against greedy generation, for both tokenizer kinds.

``DistributionPredictor`` reads P(price = n), n in 1..999: with the Llama 3.1 tokenizer (every
number one token) in ONE forward pass per batch; with SmolLM2's digit tokenizer by the digit tree,
also one forward pass per batch (each prompt followed by its 99 branch tokens under a tree-shaped
attention mask). ``GeneratePredictor`` generates a few tokens greedily and parses them. Per tokenizer,
every decoder runs on the same model and books. The two models differ in size (their vocabularies,
128,256 and 49,152 tokens, are most of their parameters), so the SmolLM2 model also times the
single-token path's pass itself, reading 999 arbitrary tokens (its prices mean nothing, no MAE):
the digit tree against one pass on the same model.

Offline there is no Llama 3.1 model, so this benchmark trains two TINY random-init
``LlamaForCausalLM`` of the same shape, one per tokenizer (Llama 3.1, SmolLM2), for a few seconds on
the curated smoke training prompts, the loss on the answer tokens only. Their MAEs compare
*decoders* on one model; they say nothing about how well a real LLM prices books. In a stand-in
the output layer (vocabulary x 128) is most of a token's work, so the digit tree's 100 full
softmaxes per book weigh far more than in a real LLM; the decoders are also timed on the real
SmolLM2-135M (the smoke profile's base model, untuned, float32) on ``--real-books`` books (8; 0 skips
it). Where llama.cpp is installed (``make llama-cpp``), the same SmolLM2-135M is also written as GGUF (the
course's writer: f16, q8_0; llama.cpp's quantiser: q4_K_M) and run by llama.cpp on the same books, the
distribution and greedy generation each, with its speed against transformers' (float32) side by side.
Run: ``python benchmarks/bench_predict.py [--epochs N] [--real-books N] [--threads N]`` (needs
``python -m helpers.curate`` first).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from helpers import config, gguf_export, llamacpp
from helpers.assets import llama3_tokenizer_offline, load_tokenizer, smollm2_checkpoint
from helpers.dataset import eval_items, load_curated
from helpers.evaluate import Evaluation, evaluate
from helpers.items import Item
from helpers.predict import LARGEST_PRICE, MAX_NEW_TOKENS, TREE_BRANCHES, DistributionPredictor, GeneratePredictor


def tiny_llama(vocab_size: int, pad_token_id: int) -> LlamaForCausalLM:
    torch.manual_seed(config.SEED)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_token_id, tie_word_embeddings=True,
    ))


def train_on_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, items: list[Item],
                     epochs: int, batch_size: int, learning_rate: float) -> list[float]:
    """Teach ``model`` the answers: cross-entropy on each example's answer tokens ("21.00" and the end
    token), the last tokens of left-padded examples."""
    texts = [item.prompt + tokenizer.eos_token for item in items]
    answer_tokens = torch.tensor([len(tokenizer.encode(item.completion + tokenizer.eos_token, add_special_tokens=False))
                                  for item in items])
    longest = int(answer_tokens.max())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(config.SEED)
    epoch_losses = []
    model.train()
    for _ in range(epochs):
        losses = []
        for batch in torch.randperm(len(texts), generator=generator).split(batch_size):
            inputs = tokenizer([texts[index] for index in batch], padding=True, padding_side="left",
                               return_tensors="pt")
            logits = model(**inputs, logits_to_keep=longest + 1).logits[:, :-1]
            targets = inputs["input_ids"][:, -longest:].clone()
            targets[torch.arange(longest) < longest - answer_tokens[batch][:, None]] = -100  # prompt, not answer
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


def decoder_rows(label: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[Item],
                 batch_size: int, repeats: int) -> list[tuple[Evaluation, float, bool]]:
    """Every decoder on ``model``, as (evaluation, best items/s, whether its prices mean anything): the distribution
    and its three readings, batched greedy generation, then one book at a time for a single-token tokenizer, or the
    single-token path's pass itself for a digit tokenizer."""
    distribution = DistributionPredictor(model, tokenizer, batch_size)
    generate = GeneratePredictor(model, tokenizer, batch_size)
    for predictor in (distribution, generate):  # warm-up: first-call allocations are not what we measure
        predictor(items[:2])
    median, rate = timed(f"{label}: {distribution.path}, median", distribution, items, repeats)
    readings = distribution(items)
    rows = [(median, rate, True)]
    for reading in ("mean", "argmax"):  # the same pass, read differently: the same speed
        readings.reading = reading
        rows.append((evaluate(f"{label}: {distribution.path}, {reading}", lambda batch: readings, items,
                              batched=True), rate, True))
    rows.append((*timed(f"{label}: greedy generation, batch {batch_size}", generate, items, repeats), True))
    if distribution.path == "single-token":
        rows.append((*timed(f"{label}: greedy generation, batch 1", GeneratePredictor(model, tokenizer, 1), items,
                            repeats), True))
    else:  # the single-token path's code on this model: its one pass per batch, 999 tokens that are no numbers
        one_pass = DistributionPredictor(model, tokenizer, batch_size)
        one_pass.number_ids = list(range(1, LARGEST_PRICE + 1))
        one_pass(items[:2])
        rows.append((*timed(f"{label}: single-token pass (no prices)", one_pass, items, repeats), False))
    return rows


def multiply_adds(model: PreTrainedModel, prompt_tokens: float) -> dict[str, float]:
    """Estimated multiply-adds per book of each decoder on ``model`` (a Llama shape), from its shape alone: the
    body (attention projections and MLP of every layer) per token read, and the output layer (vocabulary x
    hidden) per position whose full logits are needed. Attention scores are left out (short prompts)."""
    shape = model.config
    head_dim = getattr(shape, "head_dim", None) or shape.hidden_size // shape.num_attention_heads
    layer = shape.hidden_size * head_dim * 2 * (shape.num_attention_heads + shape.num_key_value_heads) \
        + 3 * shape.hidden_size * shape.intermediate_size
    body, head = shape.num_hidden_layers * layer, shape.vocab_size * shape.hidden_size
    return {
        "single-token pass": body * prompt_tokens + head,  # the prompt, the logits at its last token
        # the prompt and its 99 branch tokens; every branch position and the prompt's last need a full softmax
        "digit tree": body * (prompt_tokens + TREE_BRANCHES) + (TREE_BRANCHES + 1) * head,
        "greedy generation": body * (prompt_tokens + MAX_NEW_TOKENS - 1) + MAX_NEW_TOKENS * head,  # one per token
        "output layer share": head / (body + head),
    }


def arithmetic_lines(label: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[Item],
                     batch_size: int, rates: dict[str, float]) -> list[str]:
    """The digit tree's speed against one pass and greedy generation: the ratio its arithmetic allows (estimated)
    beside the ratio measured in this run."""
    prompt_tokens = sum(len(tokenizer.encode(item.test_prompt)) for item in items) / len(items)
    work = multiply_adds(model, prompt_tokens)
    tree = rates[f"{label}: digit tree, median"]
    return [f"{label} ({prompt_tokens:.0f} prompt tokens a book; the output layer is {work['output layer share']:.0%} "
            "of a token's multiply-adds):"] + [
        f"  digit tree / {other}: {work[other] / work['digit tree']:.2f} by arithmetic (estimated), "
        f"{tree / rates[name]:.2f} measured"
        for other, name in (("single-token pass", f"{label}: single-token pass (no prices)"),
                            ("greedy generation", f"{label}: greedy generation, batch {batch_size}"))]


def llama_cpp_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, books: list[Item], repeats: int,
                   threads: int | None, folder: Path, loads: dict[str, float]) -> list[tuple[Evaluation, float, bool]]:
    """The same model written as GGUF in ``folder`` (f16 and q8_0 by the course's writer, q4_K_M by llama.cpp's
    quantiser) and run by llama.cpp: its distribution (median) and greedy generation, on ``books``; the f16
    distribution also on one thread. Each file's loading time goes into ``loads``."""
    ggufs = {}
    for kind in gguf_export.GGUF_TYPES:
        ggufs[kind] = folder / f"gguf-{kind}"
        ggufs[kind].mkdir()
        gguf_export.write_gguf(model, tokenizer, ggufs[kind] / gguf_export.GGUF_NAME, kind, "SmolLM2-135M",
                               "apache-2.0", config.SMOLLM2_HUB_ID, {})
    ggufs |= {kind: llamacpp.quantize(ggufs["f16"], kind) for kind in llamacpp.QUANTISED}
    one_by_one = DistributionPredictor(model, tokenizer, 1)  # as llama.cpp reads them: one book a pass
    one_by_one(books[:2])
    rows = [(*timed("SmolLM2-135M: digit tree, batch 1, median", one_by_one, books, repeats), True)]
    for kind, gguf_folder in ggufs.items():
        started = time.perf_counter()
        engine = llamacpp.Engine(gguf_folder / gguf_export.GGUF_NAME, threads)
        loads[f"llama.cpp {kind}"] = time.perf_counter() - started
        distribution, generate = llamacpp.GGUFPredictor(engine), llamacpp.GGUFGeneratePredictor(engine)
        for predictor in (distribution, generate):  # warm-up, as for transformers
            predictor(books[:2])
        rows.append((*timed(f"SmolLM2-135M: llama.cpp {kind}, {distribution.path}, median", distribution, books,
                            repeats), True))
        rows.append((*timed(f"SmolLM2-135M: llama.cpp {kind}, greedy generation", generate, books, repeats), True))
        engine.close()
    engine = llamacpp.Engine(ggufs["f16"] / gguf_export.GGUF_NAME, 1)
    rows.append((*timed("SmolLM2-135M: llama.cpp f16, 1 thread, digit tree, median", llamacpp.GGUFPredictor(engine),
                        books, repeats), True))
    engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(config.PROFILES), default="smoke")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each decoder; the best counts")
    parser.add_argument("--real-books", type=int, default=8,
                        help="books to time the decoders on with the real SmolLM2-135M (float32); 0: skip it")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: every core here)")
    args = parser.parse_args()
    profile = config.get_profile(args.profile)
    train, test = load_curated(profile)
    items = eval_items(test, profile)
    batch_size = profile.predict_batch_size
    rows, decoded = [], []  # decoded: (label, model, tokenizer, books) of each model the decoders ran on
    for label, tokenizer in (("Llama 3.1", llama3_tokenizer_offline()), ("SmolLM2", load_tokenizer("smollm2"))):
        model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
        started = time.perf_counter()
        losses = train_on_answers(model, tokenizer, train, args.epochs, batch_size, args.learning_rate)
        print(f"Stand-in model, {label} tokenizer: a tiny random-init Llama ({model.num_parameters() / 1e6:.1f}M "
              f"parameters) trained {time.perf_counter() - started:.0f} s on {len(train)} smoke training prompts; "
              f"answer loss {losses[0]:.2f} -> {losses[-1]:.2f}.", flush=True)
        rows += decoder_rows(label, model, tokenizer, items, batch_size, args.repeats)
        decoded.append((label, model, tokenizer, items))
    print("Their MAEs compare decoders on one model per tokenizer, not the quality of a real LLM.")
    if args.real_books:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32).eval()
        loads = {"transformers float32": time.perf_counter() - started}
        tokenizer, books = load_tokenizer("smollm2"), items[:args.real_books]
        rows += decoder_rows("SmolLM2-135M", model, tokenizer, books, batch_size, args.repeats)
        decoded.append(("SmolLM2-135M", model, tokenizer, books))
        print(f"SmolLM2-135M: the real model (untuned, float32) on the first {args.real_books} of the books.")
        if llamacpp.installed():
            with tempfile.TemporaryDirectory() as folder:
                rows += llama_cpp_rows(model, tokenizer, books, args.repeats, args.threads, Path(folder), loads)
            print("Loading the model: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in loads.items())
                  + " (measured).")
            print(f"llama.cpp: the same model as GGUF on the same books, {args.threads or llamacpp.threads()} threads.")
        else:
            print(f"llama.cpp is not installed, so it is not timed: {llamacpp.INSTALL}.")
    print(f"\n{'decoder':<58}{'items/s':>10}{'MAE $':>10}{'failed':>8}{'80% cover':>11}")
    for evaluation, rate, priced in rows:
        metrics = evaluation.metrics
        mae, failed = (f"{metrics['mae']:.2f}", metrics["n_failed"]) if priced else ("-", "-")
        coverage = "-" if evaluation.reading == "point" or not priced else f"{metrics['coverage']:.0%}"
        print(f"{evaluation.name:<58}{rate:>10.3g}{mae:>10}{failed:>8}{coverage:>11}")
    print(f"\nOn the same {len(items)} books, best of {args.repeats} runs each; mean and argmax come from the "
          "median's pass (same speed). Measured on this machine.")
    rates = {evaluation.name: rate for evaluation, rate, _ in rows}
    print(f"\nThe digit tree's floor: a book reads {TREE_BRANCHES} tokens more (its branches) and needs "
          f"{TREE_BRANCHES + 1} full-vocabulary softmaxes, against 1 for one pass and {MAX_NEW_TOKENS} for greedy "
          f"generation ({MAX_NEW_TOKENS - 1} tokens more).")
    for label, model, tokenizer, books in decoded:
        if f"{label}: digit tree, median" in rates:
            print("\n".join(arithmetic_lines(label, model, tokenizer, books, batch_size, rates)))
    engine_rates = {name: rate for name, rate in rates.items() if "llama.cpp" in name}
    if engine_rates:
        print(f"\nllama.cpp against transformers (float32, batch {batch_size}) on SmolLM2-135M, the same books "
              "(measured, this machine):")
        for name, rate in engine_rates.items():
            versus = ([f"SmolLM2-135M: greedy generation, batch {batch_size}"] if name.endswith("greedy generation")
                      else ["SmolLM2-135M: digit tree, median", "SmolLM2-135M: digit tree, batch 1, median"])
            print(f"  {name.removeprefix('SmolLM2-135M: ')}: " + ", ".join(
                f"{rate / rates[other]:.2f}x transformers' {other.split(': ')[1].removesuffix(', median')}"
                for other in versus))
        label, model, tokenizer, books = decoded[-1]
        prompt_tokens = sum(len(tokenizer.encode(item.test_prompt)) for item in books) / len(books)
        work = multiply_adds(model, prompt_tokens)["digit tree"]
        print(f"Why: both engines do the same arithmetic, about {work / 1e9:.0f} G multiply-adds a book for the digit "
              f"tree ({prompt_tokens:.0f} prompt tokens and {TREE_BRANCHES} branches in one pass; estimated from the "
              "model's shape), so a speed is the multiply-adds a second each sustains here: " + ", ".join(
                  f"{name.removeprefix(label + ': ').removesuffix(', median')} {rates[name] * work / 1e9:.0f} G/s"
                  for name in rates if name.startswith(f"{label}: ") and "digit tree" in name
                  and name.endswith("median")) + ". A quantised file stores fewer bytes, not fewer multiply-adds, "
              "and a pass this long is bound by the arithmetic, not by reading the weights.")


if __name__ == "__main__":
    main()

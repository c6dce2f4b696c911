"""The offline lm-eval tasks kept in the repository (``src/evaluation/tasks``): made here, from a fixed seed.

Three tasks, one per lm-eval request type, so CI evaluates every path of a model without the hub:

- ``hpi_arith_mc`` (multiple_choice -> ``loglikelihood``): "Question: what is 12 plus 7 ? Answer:" with four
  numbers to choose from;
- ``hpi_count_ppl`` (``loglikelihood_rolling``): counting runs ("count from 17 : 17 18 19 ... ."), scored as
  perplexity;
- ``hpi_arith_gen`` (``generate_until``): "Question: what is 12 minus 7 ? Answer:", the answer generated and
  matched exactly.

Every text is words of ``WORDS`` separated by single spaces, so a word-level tokenizer over ``WORDS`` spells
every item (the tests build one; a real tokenizer spells them as well). Regenerate the files with
``python -m hpi.evaluation.offline_tasks`` (the same seed gives the same bytes; tests check that).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SEED = 17
MAX_NUMBER = 200  # numbers 0 .. MAX_NUMBER - 1 are words
WORDS = (("Question:", "Answer:", "what", "is", "plus", "minus", "?", "count", "from", ":", ".")
         + tuple(str(n) for n in range(MAX_NUMBER)))
N_MC, N_GEN, N_PPL = 200, 100, 40
TASK_NAMES = ("hpi_arith_mc", "hpi_count_ppl", "hpi_arith_gen")


def arith_mc_items(rng: random.Random, n: int) -> list[dict]:
    """Sums of two numbers below 100; the answer among three other sums within +-9 of it."""
    items = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        answer = a + b
        others = rng.sample([answer + d for d in range(-9, 10) if d and 0 <= answer + d < MAX_NUMBER], 3)
        choices = [str(c) for c in others]
        gold = rng.randrange(4)
        choices.insert(gold, str(answer))
        items.append({"question": f"Question: what is {a} plus {b} ? Answer:", "choices": choices, "gold": gold})
    return items


def arith_gen_items(rng: random.Random, n: int) -> list[dict]:
    """Differences of two numbers below 100, never negative."""
    items = []
    for _ in range(n):
        a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
        items.append({"question": f"Question: what is {a} minus {b} ? Answer:", "answer": str(a - b)})
    return items


def count_ppl_items(rng: random.Random, n: int) -> list[dict]:
    """Counting runs of 10 to 60 numbers."""
    items = []
    for _ in range(n):
        length = rng.randrange(10, 61)
        start = rng.randrange(MAX_NUMBER - length)
        run = " ".join(str(k) for k in range(start, start + length))
        items.append({"text": f"count from {start} : {run} ."})
    return items


def build() -> dict[str, list[dict]]:
    """The items of every task's data file, from ``SEED``."""
    rng = random.Random(SEED)
    return {"arith_mc.json": arith_mc_items(rng, N_MC), "arith_gen.json": arith_gen_items(rng, N_GEN),
            "count_ppl.json": count_ppl_items(rng, N_PPL)}


def render(items: list[dict]) -> str:
    return json.dumps(items, indent=1) + "\n"


def task_tokenizer(vocab_size: int):
    """A word-level fast tokenizer that spells every task: id 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (EOS,
    tiny-llama's ids), then ``WORDS``, then ``w{i}`` up to ``vocab_size``. Split on white space, decoded joined
    by spaces; it adds no special tokens by itself (so lm-eval's and hpi's token ids agree)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>", *WORDS]
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    if len(names) > vocab_size:
        raise ValueError(f"len(WORDS) + 3 = {len(names)} > vocab_size({vocab_size}): use a larger model")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)  # keep " ?" as the items spell it


def main(out_dir: Path = TASKS_DIR) -> list[Path]:
    from hpi.atomic import write_text

    written = []
    for name, items in build().items():
        path = Path(out_dir) / name
        write_text(path, render(items))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in main():
        print(p)

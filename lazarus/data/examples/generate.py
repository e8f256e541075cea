"""Regenerate the shipped example data (deterministic). Run: python -m lazarus.data.examples.generate"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def _write(name, rows):
    with open(HERE / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(1234)
    pairs = [(a, b) for a in range(13) for b in range(13)]
    rng.shuffle(pairs)
    held_out, train = pairs[:30], pairs[30:]

    def q(a, b):
        return f"What is {a}+{b}?"

    _write("sft_train.jsonl", [{"prompt": q(a, b), "response": str(a + b)} for a, b in train])
    _write("sft_eval.jsonl", [{"prompt": q(a, b), "response": str(a + b)} for a, b in held_out])
    prefs = []
    for a, b in train:
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        prefs.append({"prompt": q(a, b), "chosen": str(a + b), "rejected": str(max(wrong, 0) if wrong != a + b else a + b + 1)})
    _write("preferences.jsonl", prefs)
    # KTO's unpaired form of the same pairs: each chosen answer desirable, each rejected one not
    _write("kto.jsonl", [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                         for p in prefs for side in ("chosen", "rejected")])
    _write("prompts_train.jsonl", [{"prompt": q(a, b), "answer": str(a + b)} for a, b in train])
    _write("prompts_eval.jsonl", [{"prompt": q(a, b), "answer": str(a + b)} for a, b in held_out])


if __name__ == "__main__":
    main()

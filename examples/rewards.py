"""Reward functions for the GRPO/PPO examples (``reward: examples/rewards.py:correct_sum`` in YAML).

A reward function gets the prompts, the sampled completions and every other column of the
prompt dataset (here ``answer``), aligned one per completion, and returns one float each.
"""


def correct_sum(prompts, completions, answer, **columns):
    """1.0 when the completion is exactly the expected answer, else 0.0."""
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answer)]


def close_sum(prompts, completions, answer, **columns):
    """Partial credit: 1 / (1 + |completion - answer|) for numeric completions, 0.0 otherwise."""
    out = []
    for c, a in zip(completions, answer):
        try:
            out.append(1.0 / (1.0 + abs(int(c.strip()) - int(a))))
        except ValueError:
            out.append(0.0)
    return out

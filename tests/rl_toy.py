"""rl.py with a toy reward (the fraction of sampled tokens equal to TOY_TARGET, or with an even id for
TOY_TARGET=even: about half of any random model's tokens, so every group's rewards differ), for the DDP, resume and
learning-signal tests: a random tiny model can learn it in a few steps. TOY_CRASH_AT=k raises at the
train section of step k (an interruption right after the checkpoint at the top of that step)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl  # noqa: E402

TARGET = os.environ.get("TOY_TARGET", "even")
CRASH = int(os.environ.get("TOY_CRASH_AT", "-1"))


def toy_rewards(results, args):
    rewards, parts, turns = [], [], []
    for res in results:
        ids = [i for s in res["segments"] for i, m in zip(s["ids"], s["mask"]) if m]
        r = sum(i % 2 == 0 if TARGET == "even" else i == int(TARGET) for i in ids) / max(1, len(ids))
        rewards.append(r)
        parts.append({k: r for k in ("format", "turns", "success", "efficiency", "awareness")})
        turns.append([r])
    return torch.tensor(rewards, dtype=torch.float64), parts, turns


_lr_at = rl.lr_at


def lr_at(step, args):
    if step == CRASH:
        raise SystemExit(f"toy crash at step {step}")
    return _lr_at(step, args)


rl.episode_rewards, rl.lr_at = toy_rewards, lr_at
if __name__ == "__main__":
    rl.main(rl.parser.parse_args())

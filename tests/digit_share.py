"""Rewards for trainer tests: the share of digits in a completion, so that even a random policy gets varied rewards
and non-zero advantages (the task's real reward is 0 for every completion of an untrained model), and whether it
holds a digit at all (0 or 1: small groups are often all-equal, what dynamic sampling drops). Imported by the tests
and, through `python -c`, by the training subprocesses they start."""

from kalmanrl.data.rewards import RewardFunction, Verdict, register_reward


@register_reward("digit_share")
class DigitShare(RewardFunction):
    def screen(self, completion: str, gold: str) -> Verdict:
        return Verdict(sum(c.isdigit() for c in completion) / max(1, len(completion)), False, None)


@register_reward("has_digit")
class HasDigit(RewardFunction):
    def screen(self, completion: str, gold: str) -> Verdict:
        has = any(c.isdigit() for c in completion)
        return Verdict(float(has), has, None)

"""Types of command-line values (argparse's `type=`): each refuses a value out of its range in one line, where it
would otherwise fail later in a traceback (a negative seed in numpy) or train quietly on nonsense (a NaN rate); and
the parser that says so in one line."""
from __future__ import annotations

import argparse
import math

SEED_MAX = 2 ** 63 - 1   # numpy's and torch's seeds both take 0 ..  this


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (a value out of range, an unknown flag) are one line and its exit status 2,
    not its usage block of every flag with the error last; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the flags)\n")


def ints(text: str) -> list[int]:
    """'1,2,2,4' -> [1, 2, 2, 4]"""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """Width multipliers: '1,2,4' -> [1, 2, 4], each 1 or more."""
    values = ints(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of 1 or more, got {text!r}")
    return values


def positive(kind):
    """A finite number above 0 (NaN and infinity refused: `nan <= 0` is False)."""
    def parse(text):
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative(kind):
    """A finite number of 0 or more: a loss weight, a count of steps that may be none."""
    def parse(text):
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1]: --cooldown's share of the run."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def seed(text: str) -> int:
    """A seed numpy and torch both take."""
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2^63 - 1, got {text}")
    return value


def step_or_fraction(text: str) -> int | float:
    """--adversarial-start: '1200' -> step 1200; '0.25' -> a quarter of the run's steps."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = -1
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"expected a step (an integer) or a fraction in [0, 1), got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value

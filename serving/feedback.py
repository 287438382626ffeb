"""Ground-truth feedback: remember recent answers, score them when clients post labels.

Live accuracy of exit i = correct / labelled among the answers *given by* exit i
(in a cascade, the exit that answered — not the earlier exits that were evaluated
and passed on). That is the accuracy users actually got from that exit.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from .errors import FeedbackConflict, UnknownRequestId


@dataclass
class Answer:
    """What the server answered for one request id."""

    exit: int
    label: int
    labelled: bool = False


class FeedbackStore:
    """A bounded LRU of recent answers plus per-exit feedback counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()
        self.total: collections.Counter[int] = collections.Counter()
        self.correct: collections.Counter[int] = collections.Counter()

    def remember(self, request_id: str, exit_number: int, label: int) -> None:
        """Keep an answer; the oldest one is forgotten when the store is full."""
        self._answers[request_id] = Answer(exit_number, label)
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def record(self, request_id: str, true_label: int) -> tuple[Answer, bool, float]:
        """Score the answer for ``request_id``; returns (answer, correct, exit's live accuracy).

        Raises UnknownRequestId (404) for ids never issued or already forgotten, and
        FeedbackConflict (409) for a second label on the same id, so nothing is
        counted twice.
        """
        answer = self._answers.get(request_id)
        if answer is None:
            raise UnknownRequestId(
                f"no recent answer has id {request_id!r}; feedback is accepted for the ids returned by "
                f"POST /classify while they are among the last {self.capacity} answers"
            )
        if answer.labelled:
            raise FeedbackConflict(f"feedback for id {request_id!r} was already recorded; each answer counts once")
        answer.labelled = True
        correct = answer.label == true_label
        self.total[answer.exit] += 1
        self.correct[answer.exit] += int(correct)
        return answer, correct, self.correct[answer.exit] / self.total[answer.exit]

    def live_accuracy(self) -> dict[int, float]:
        """Exit → live accuracy, for exits with at least one labelled answer."""
        return {e: self.correct[e] / n for e, n in sorted(self.total.items()) if n}

    def __len__(self) -> int:
        return len(self._answers)

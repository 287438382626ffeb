"""Ground-truth feedback that works on any replica: signed answer ids.

The ``id`` of every answer is a token that carries what ``POST /feedback`` needs —
model name, answering exit, predicted label, issue time and a random nonce — signed
with HMAC-SHA256 under ``EED_FEEDBACK_SECRET``. Any replica that shares the secret
can verify it without having seen the request, so feedback behind a load balancer
never depends on hitting the replica that answered.

Token layout (URL-safe, no padding): ``v1.<base64url(JSON claims)>.<base64url(MAC)>``
with the MAC over ``v1.<claims part>``. Nothing in the claims is secret; the MAC only
proves that a server holding the secret issued them.

Live accuracy of exit i = correct / labelled among the answers *given by* exit i
(in a cascade, the exit that answered — not the earlier exits that were evaluated
and passed on). The server exports it as counters (``eed_feedback_total{exit,
correct}``) so that replicas sum; the ratio is a Prometheus recording rule.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import heapq
import hmac
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass

from .errors import ExpiredFeedbackId, FeedbackConflict, ForgedFeedbackId
from .randomhex import RandomHex

log = logging.getLogger("serving.feedback")

VERSION = "v1"
_VERSION_DOT = f"{VERSION}.".encode("ascii")
MAC_BYTES = 16  # 128-bit tag: forging one takes ~2^128 tries
MIN_SECRET_BYTES = 16
# A token longer than this was not issued by us (model names are short); refuse it
# before decoding anything.
MAX_TOKEN_CHARS = 1024
# How far ahead of this replica's clock an id's issue time may be: replicas' clocks differ a
# little (NTP keeps them within milliseconds), but an id dated further ahead — a replica with a
# wrong clock — would stay acceptable for MAX_AGE_S beyond its real age, replays included.
MAX_CLOCK_AHEAD_S = 60.0


@dataclass(frozen=True)
class Claim:
    """What a verified answer id says about the answer."""

    model: str
    exit: int
    label: int
    issued_at: float  # Unix time, seconds
    nonce: str


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64encode(data: bytes) -> bytes:
    """URL-safe base64 without padding, in C calls only: ``base64.urlsafe_b64encode`` is two Python
    frames more, and every answer pays its signing cold, right after an ORT run."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AnswerSigner:
    """Issues and verifies signed answer ids."""

    def __init__(self, secret: bytes | None, max_age_s: float) -> None:
        if secret is None:
            secret = secrets.token_bytes(32)
            log.warning(
                "EED_FEEDBACK_SECRET is not set: answer ids are signed with a random per-process key, so "
                "POST /feedback accepts only ids issued by this process; set the same EED_FEEDBACK_SECRET "
                "on every replica behind a load balancer"
            )
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the feedback secret must be at least {MIN_SECRET_BYTES} bytes")
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)  # the key's HMAC state, computed once
        self.max_age_s = max_age_s
        self._names: dict[str, str] = {}  # model name -> its JSON string
        self._nonces = RandomHex(16)  # 64 random bits per answer, drawn from the OS in bulk

    def _mac(self, signed_part: bytes) -> bytes:
        # A copy of the keyed state, not hmac.digest(): OpenSSL 3's one-shot HMAC looks the digest
        # up by name on every call (1.7 vs 1.1 µs hot; ~+25 µs per answer when run cold after an
        # ORT run, docs/request-path-profile.md, eleventh session).
        mac = self._keyed.copy()
        mac.update(signed_part)
        return mac.digest()[:MAC_BYTES]

    def issue(self, model: str, exit_number: int, label: int, now: float | None = None) -> str:
        """A signed id for an answer of ``model`` given by ``exit_number`` predicting ``label``."""
        # Every answer gets one, on the event loop: the claims are written out directly (the JSON
        # json.dumps would give, separators (",", ":")), the model name escaped once.
        name = self._names.get(model)
        if name is None:
            name = self._names[model] = json.dumps(model)
        issued = round(time.time() if now is None else now, 3)
        claims = f'{{"m":{name},"e":{int(exit_number)},"l":{int(label)},"t":{issued!r},"n":"{self._nonces.take()}"}}'
        signed_part = _VERSION_DOT + _b64encode(claims.encode())
        return (signed_part + b"." + _b64encode(self._mac(signed_part))).decode("ascii")

    def verify(self, token: str, now: float | None = None) -> Claim:
        """The claims of a genuine, unexpired id; ForgedFeedbackId (403) or ExpiredFeedbackId (410) otherwise."""
        forged = ForgedFeedbackId(
            "this id was not issued by a server of this deployment (bad format or signature); post the 'id' "
            "of a /classify or /v2 answer unchanged. Replicas must share EED_FEEDBACK_SECRET to accept each "
            "other's ids"
        )
        # Ids we issue are ASCII; a non-ASCII one was a 500 (UnicodeEncodeError) before the MAC check.
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 2:
            raise forged
        version, body, tag = token.split(".")
        if version != VERSION:
            raise forged
        # The tag as we write it, compared as text: base64 decoding is lenient (spare low bits,
        # the '+/' alphabet, junk characters), so decoding the given tag let many strings pass for
        # one id, and anything keyed on the id string outside the server could be fooled.
        expected = _b64encode(self._mac(f"{version}.{body}".encode("ascii")))
        if not hmac.compare_digest(tag.encode("ascii"), expected):
            raise forged
        # Signed by us, so the claims are well-formed; parse defensively all the same.
        try:
            raw = json.loads(_b64decode(body))
            claim = Claim(
                model=str(raw["m"]),
                exit=int(raw["e"]),
                label=int(raw["l"]),
                issued_at=float(raw["t"]),
                nonce=str(raw["n"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise forged from None
        if not math.isfinite(claim.issued_at):  # NaN would pass the age check below
            raise forged
        age = (time.time() if now is None else now) - claim.issued_at
        if -age > MAX_CLOCK_AHEAD_S:
            raise ForgedFeedbackId(
                f"this id is dated {-age:.0f} s ahead of this server's clock (at most {MAX_CLOCK_AHEAD_S:g} s "
                "accepted); the clocks of this deployment's replicas disagree — synchronise them (NTP)"
            )
        if age > self.max_age_s:
            raise ExpiredFeedbackId(
                f"this id was issued {age:.0f} s ago; feedback is accepted for {self.max_age_s:g} s after an "
                "answer (EED_FEEDBACK_MAX_AGE_S)",
                max_age_s=self.max_age_s,
            )
        return claim


class FeedbackStore:
    """This replica's record of feedback: ids already labelled (bounded) and per-exit counts.

    The counts feed ``/v1/model`` and the ``/feedback`` answer for this replica; the
    deployment-wide figure is the sum of every replica's counters in Prometheus.
    Each answer counts at most once per replica: a repeated label for an id is refused (409)
    until the id expires (``max_age_s`` after its answer; verification refuses it then).
    The memory holds ``capacity`` ids; past that, the id issued longest ago is forgotten and
    every id issued no later than it is refused as possibly labelled (409, worded so), since
    the replica can no longer tell — with a warning to raise the capacity. Replicas do not
    share this memory.
    """

    def __init__(self, capacity: int, max_age_s: float) -> None:
        self.capacity, self.max_age_s = capacity, max_age_s
        self._labelled: set[str] = set()
        self._by_issue: list[tuple[float, str]] = []  # heap: (issued_at, nonce) of the ids in _labelled
        # Issue time of the newest id forgotten so far: any id not remembered and issued no later
        # may have been labelled. Forgetting by labelling order (as before) let a client with
        # capacity + 1 ids of its own re-label them in turn, each counted again.
        self._forgotten_up_to = -math.inf
        self._warned = False
        self.total: collections.Counter[int] = collections.Counter()
        self.correct: collections.Counter[int] = collections.Counter()

    def record(self, claim: Claim, true_label: int, now: float | None = None) -> tuple[bool, float]:
        """Score one verified answer; returns (correct, this replica's live accuracy of its exit)."""
        if claim.nonce in self._labelled:
            raise FeedbackConflict(
                "this replica already recorded feedback for this id; each answer counts once per replica "
                "(replicas and restarts do not share what they recorded: EED_FEEDBACK_CAPACITY)"
            )
        if claim.issued_at <= self._forgotten_up_to:
            raise FeedbackConflict(
                "this replica cannot tell whether this id was labelled already: it has labelled more than "
                f"EED_FEEDBACK_CAPACITY={self.capacity} answers given since, and remembers only the newest; "
                "feedback for it is not counted (raise EED_FEEDBACK_CAPACITY to accept later feedback)"
            )
        self._labelled.add(claim.nonce)
        heapq.heappush(self._by_issue, (claim.issued_at, claim.nonce))
        if len(self._labelled) > self.capacity:
            issued_at, nonce = heapq.heappop(self._by_issue)
            self._labelled.discard(nonce)
            self._forgotten_up_to = max(self._forgotten_up_to, issued_at)
            if issued_at + self.max_age_s > (time.time() if now is None else now) and not self._warned:
                self._warned = True
                log.warning(
                    "more than EED_FEEDBACK_CAPACITY=%d labelled answer ids are younger than "
                    "EED_FEEDBACK_MAX_AGE_S=%g s: feedback for answers issued before the newest forgotten one "
                    "is refused (409); raise the capacity or lower the age",
                    self.capacity,
                    self.max_age_s,
                )
        correct = claim.label == true_label
        self.total[claim.exit] += 1
        self.correct[claim.exit] += int(correct)
        return correct, self.correct[claim.exit] / self.total[claim.exit]

    def live_accuracy(self) -> dict[int, float]:
        """Exit → live accuracy on this replica, for exits with at least one labelled answer."""
        return {e: self.correct[e] / n for e, n in sorted(self.total.items()) if n}

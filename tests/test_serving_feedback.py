"""Replica-safe feedback: signed answer ids verified by any server that shares EED_FEEDBACK_SECRET.

Two real server processes (``python -m serving``) stand in for two replicas behind a
load balancer: answers come from one, feedback goes to the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from serving_model import (
    NUM_CLASSES,
    NUM_EXITS,
    ROOT,
    ServerProcess,
    build_model_folder,
    encode,
    expected_label,
    uniform_image,
)

from serving.errors import ExpiredFeedbackId, FeedbackConflict, ForgedFeedbackId
from serving.feedback import MAX_CLOCK_AHEAD_S, AnswerSigner, Claim, FeedbackStore

SECRET = "a-shared-secret-for-tests-0123456789"
RULES = ROOT / "docker/prometheus/rules/feedback.yml"
RULES_TEST = ROOT / "tests/prometheus/feedback_test.yml"
PROMTOOL = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin:/usr/local/bin")


def png(c: int) -> bytes:
    return encode(uniform_image(c), "PNG")


def classify(url: str, c: int, **params) -> dict:
    r = httpx.post(url + "/classify", content=png(c), headers={"Content-Type": "image/png"}, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def feedback(url: str, answer_id: str, label) -> httpx.Response:
    return httpx.post(url + "/feedback", json={"id": answer_id, "label": label}, timeout=30)


def feedback_counts(url: str) -> dict[tuple[str, str], float]:
    """(exit, correct) → eed_feedback_total."""
    counts = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = re.match(r'^eed_feedback_total\{correct="(\w+)",exit="(\d+)"\} (\S+)$', line)
        if m:
            counts[(m.group(2), m.group(1))] = float(m.group(3))
    return counts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    """Two servers with one secret, and a third with another secret."""
    tmp = tmp_path_factory.mktemp("replicas")
    env = {**os.environ, "EED_FEEDBACK_SECRET": SECRET}
    other = {**env, "EED_FEEDBACK_SECRET": "another-secret-another-secret-42"}
    args = ("--intra-op-threads", "1")
    with (
        ServerProcess(model_dir, *args, tmp_dir=tmp, env=env) as a,
        ServerProcess(model_dir, *args, tmp_dir=tmp, env=env) as b,
        ServerProcess(model_dir, *args, tmp_dir=tmp, env=other) as c,
    ):
        yield a, b, c


def test_feedback_on_another_replica_sharing_the_secret(replicas):
    a, b, _ = replicas
    before = feedback_counts(b.url)
    right = classify(a.url, 2, exit=1)
    wrong = classify(a.url, 2, exit=1)
    assert right["id"] != wrong["id"]

    r = feedback(b.url, right["id"], expected_label(2, 1))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["exit"], body["predicted"], body["correct"]) == (1, expected_label(2, 1), True)
    r = feedback(b.url, wrong["id"], "class-0")  # by class name
    assert r.status_code == 200 and r.json()["correct"] is False and r.json()["label"] == 0

    after = feedback_counts(b.url)
    assert after[("1", "true")] - before.get(("1", "true"), 0) == 1
    assert after[("1", "false")] - before.get(("1", "false"), 0) == 1
    # The answering replica counted nothing: the outcome is counted where the feedback lands.
    assert feedback_counts(a.url).get(("1", "true"), 0) == 0
    # Every (exit, correct) series exists from the first scrape, so rates and sums see every exit.
    assert {(str(e), c) for e in range(1, NUM_EXITS + 1) for c in ("true", "false")} <= set(after)


def test_feedback_counts_the_exit_that_answered_a_cascade(replicas):
    a, b, _ = replicas
    answer = classify(a.url, 5, confidence=0.9)  # bin 5: the cascade stops at exit 2
    assert answer["exit"] == 2
    before = feedback_counts(b.url).get(("2", "true"), 0)
    r = feedback(b.url, answer["id"], expected_label(5, 2))
    assert r.json()["exit"] == 2 and r.json()["correct"] is True
    assert feedback_counts(b.url)[("2", "true")] == before + 1


def test_a_second_label_for_the_same_answer_is_refused(replicas):
    a, b, _ = replicas
    answer = classify(a.url, 1, exit=3)
    assert feedback(b.url, answer["id"], 0).status_code == 200
    again = feedback(b.url, answer["id"], 0)
    assert again.status_code == 409 and again.json()["error"] == "feedback_already_recorded"


def _tamper(token: str, **changes) -> str:
    version, body, tag = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    new_body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{version}.{new_body}.{tag}"


def test_forged_ids_are_refused_and_count_nothing(replicas):
    a, b, c = replicas
    answer = classify(a.url, 4, exit=1)
    before = feedback_counts(b.url)
    forged = [
        "does-not-exist",
        "",
        "v1.e30.AAAA",
        _tamper(answer["id"], l=expected_label(4, 1) + 1),  # claims another prediction
        _tamper(answer["id"], e=3),  # claims another exit
        answer["id"][:-2] + ("AA" if not answer["id"].endswith("AA") else "BB"),  # altered signature
        "v1." + "A" * 5000 + ".x",
        answer["id"][:10] + "é" + answer["id"][10:],  # not ASCII: was a 500
    ]
    for token in forged:
        r = feedback(b.url, token, 0)
        assert r.status_code == 403, (token, r.text)
        assert r.json()["error"] == "invalid_feedback_id" and "EED_FEEDBACK_SECRET" in r.json()["detail"]
    # A replica with another secret cannot verify this deployment's ids.
    r = feedback(c.url, answer["id"], 0)
    assert r.status_code == 403
    assert feedback_counts(b.url) == before
    # The genuine id is still good after all that.
    assert feedback(b.url, answer["id"], expected_label(4, 1)).json()["correct"] is True


def test_labels_that_are_not_a_class_are_refused_without_using_up_the_id(replicas):
    a, b, _ = replicas
    answer = classify(a.url, 6, exit=2)
    before = feedback_counts(b.url)
    # '³' passes str.isdigit() but not int() (was a 500); '３' and '٣' are digits outside ASCII, which the
    # OpenAPI pattern refuses (were taken as 3); JSON true was taken as class 1 (and used up the id).
    # "9" * 5000: more digits than int() takes (was a 500 that closed the connection).
    for label in ("³", "３", "٣", True, False, 1.5, "1.0", -1, 999, "no-such-class", None, [1], "9" * 5000):
        r = feedback(b.url, answer["id"], label)
        assert r.status_code == 422, (label, r.status_code, r.text)
        assert r.json()["error"] and r.json()["detail"], r.text
    assert feedback_counts(b.url) == before
    # The id was not used up by any of them; a label as text with spaces and zeros is an index, and so is
    # 3.0 (an integer to JSON Schema).
    r = feedback(b.url, answer["id"], " 03 ")
    assert r.status_code == 200 and r.json()["label"] == 3, r.text
    r = feedback(b.url, classify(a.url, 6, exit=2)["id"], 3.0)
    assert r.status_code == 200 and r.json()["label"] == 3, r.text


def test_ids_signed_for_a_model_of_another_shape_are_refused(replicas):
    """Replicas of two versions of a model under one name and one secret: an id naming an exit or a
    class this model lacks is refused (404), not counted as a new exit series or an unknown class."""
    _, b, _ = replicas
    signer = AnswerSigner(SECRET.encode(), max_age_s=60)  # the deployment's secret: a genuine signature
    before = feedback_counts(b.url)
    for exit_number, label in ((NUM_EXITS + 5, 1), (0, 1), (1, NUM_CLASSES), (1, -1)):
        r = feedback(b.url, signer.issue("tiny-test", exit_number, label), 0)
        assert r.status_code == 404, (exit_number, label, r.text)
        assert "another version" in r.json()["detail"], r.text
    assert feedback_counts(b.url) == before
    assert feedback(b.url, signer.issue("tiny-test", NUM_EXITS, 0), 0).json()["correct"] is True


def test_without_a_secret_each_process_signs_with_its_own_key(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EED_FEEDBACK_SECRET"}
    with ServerProcess(model_dir, "--intra-op-threads", "1", tmp_dir=tmp_path, env=env) as solo:
        answer = classify(solo.url, 3)
        assert feedback(solo.url, answer["id"], 0).status_code == 200
        assert "EED_FEEDBACK_SECRET is not set" in solo.log()
    with ServerProcess(model_dir, "--intra-op-threads", "1", tmp_dir=tmp_path, env=env) as restarted:
        r = feedback(restarted.url, answer["id"], 0)
        assert r.status_code == 403


def test_ids_of_another_model_are_refused(replicas, tmp_path):
    a, _, _ = replicas
    other_model = build_model_folder(tmp_path / "other", name="another-model")
    env = {**os.environ, "EED_FEEDBACK_SECRET": SECRET}
    with ServerProcess(other_model, "--intra-op-threads", "1", tmp_dir=tmp_path, env=env) as other:
        answer = classify(a.url, 3)
        r = feedback(other.url, answer["id"], 0)
        assert r.status_code == 404 and "tiny-test" in r.json()["detail"] and "another-model" in r.json()["detail"]


def test_expired_ids_are_refused(model_dir, tmp_path):
    env = {**os.environ, "EED_FEEDBACK_SECRET": SECRET, "EED_FEEDBACK_MAX_AGE_S": "1"}
    with ServerProcess(model_dir, "--intra-op-threads", "1", tmp_dir=tmp_path, env=env) as short:
        answer = classify(short.url, 3)
        deadline = time.monotonic() + 30
        while True:  # no assumption on how fast the machine is: wait until the id is old
            time.sleep(1.1)
            r = feedback(short.url, answer["id"], 0)
            if r.status_code != 200 or time.monotonic() > deadline:
                break
            answer = classify(short.url, 3)  # accepted while fresh; try a new one
        assert r.status_code == 410 and r.json()["error"] == "feedback_id_expired", r.text
        assert "EED_FEEDBACK_MAX_AGE_S" in r.json()["detail"]


def test_signer_round_trip_and_refusals():
    signer = AnswerSigner(SECRET.encode(), max_age_s=60)
    token = signer.issue("m", 2, 7, now=1000.0)
    claim = signer.verify(token, now=1030.0)
    assert (claim.model, claim.exit, claim.label, claim.issued_at) == ("m", 2, 7, 1000.0)
    with pytest.raises(ExpiredFeedbackId):
        signer.verify(token, now=1061.0)
    # a replica's clock a little ahead is fine; one far ahead would make its ids outlive the max age
    assert signer.verify(token, now=1000.0 - MAX_CLOCK_AHEAD_S).label == 7
    with pytest.raises(ForgedFeedbackId, match="ahead of this server's clock"):
        signer.verify(signer.issue("m", 2, 7, now=1000.0 + 3600), now=1000.0)
    with pytest.raises(ForgedFeedbackId):
        AnswerSigner(b"x" * 16, max_age_s=60).verify(token, now=1030.0)
    with pytest.raises(ValueError):
        AnswerSigner(b"short", max_age_s=60)
    # A time that is not a number (signed all the same) would pass any age check.
    claims = json.dumps({"m": "m", "e": 2, "l": 7, "t": float("nan"), "n": "00"}).encode()
    signed = b"v1." + base64.urlsafe_b64encode(claims).rstrip(b"=")
    tag = hmac.new(SECRET.encode(), signed, hashlib.sha256).digest()[:16]
    with pytest.raises(ForgedFeedbackId):
        signer.verify((signed + b"." + base64.urlsafe_b64encode(tag).rstrip(b"=")).decode(), now=1030.0)


def test_one_id_has_one_spelling():
    # base64 decoding is lenient: spellings of the same tag bytes (spare low bits, padding, the
    # '+/' alphabet, junk characters) all verified, and anything keyed on the id string outside
    # the server (a join, a de-duplication) saw different ids for one answer.
    signer = AnswerSigner(SECRET.encode(), max_age_s=60)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    issued = ((n, signer.issue("m", 2, n, now=1000.0)) for n in range(1000))
    label, token = next((n, t) for n, t in issued if {"-", "_"} & set(t[-22:]))
    head, tag = token.rsplit(".", 1)
    spare_bit = alphabet[alphabet.index(tag[-1]) ^ 1]  # 16 bytes: the last character's low 4 bits are spare
    spellings = [tag + "!!!!", tag + "==", tag[:-1] + spare_bit, tag.replace("-", "+").replace("_", "/")]

    def lenient(text):  # what decoding the given tag read (Python's default base64 decoding)
        text = text.rstrip("=")
        return base64.urlsafe_b64decode(text + "=" * (-len(text.replace("!", "")) % 4))

    assert all(lenient(other) == lenient(tag) for other in spellings)  # the same bytes, spelt otherwise
    for other in spellings:
        with pytest.raises(ForgedFeedbackId):
            signer.verify(f"{head}.{other}", now=1030.0)
    assert signer.verify(token, now=1030.0).label == label  # the one spelling issued


def test_a_full_feedback_memory_never_counts_an_answer_twice_and_says_so(caplog):
    store = FeedbackStore(capacity=2, max_age_s=100.0)
    # Labelled out of issue order; over capacity, the id issued longest ago ("a") is forgotten.
    for nonce, issued in (("b", 110.0), ("a", 60.0), ("c", 115.0)):
        store.record(Claim("m", 1, 0, issued, nonce), 0, now=120.0)
    assert "EED_FEEDBACK_CAPACITY=2" in caplog.text and "raise the capacity" in caplog.text  # said once
    for nonce, issued in (("b", 110.0), ("c", 115.0), ("a", 60.0)):  # remembered, or possibly labelled
        with pytest.raises(FeedbackConflict):
            store.record(Claim("m", 1, 0, issued, nonce), 0, now=121.0)
    # An id older than everything remembered is the one forgotten at once, on its first label; its
    # repeats are refused all the same (before, forgetting by labelling order let a client re-label
    # capacity + 1 ids of its own in turn, each counted again).
    store.record(Claim("m", 1, 0, 70.0, "old"), 0, now=121.0)
    for _ in range(3):
        with pytest.raises(FeedbackConflict, match="cannot tell whether this id was labelled"):
            store.record(Claim("m", 1, 0, 70.0, "old"), 0, now=122.0)
    store.record(Claim("m", 1, 0, 118.0, "new"), 0, now=122.0)  # a newer answer's first label counts
    assert store.total[1] == 5
    caplog.clear()
    store = FeedbackStore(capacity=1, max_age_s=100.0)
    store.record(Claim("m", 1, 0, 15.0, "x"), 0, now=100.0)
    store.record(Claim("m", 1, 0, 110.0, "y"), 0, now=121.0)  # "x" expired at 115: forgotten silently
    assert "EED_FEEDBACK_CAPACITY" not in caplog.text


def test_the_tag_is_hmac_sha256_of_the_signed_part():
    # The id's format is what replicas of other versions verify (a rolling upgrade shares the
    # secret): base64url, unpadded, of the first 16 bytes of HMAC-SHA256 over "v1.<claims>".
    token = AnswerSigner(SECRET.encode(), max_age_s=60).issue("m", 2, 7, now=1000.0)
    version, body, tag = token.split(".")
    expected = hmac.new(SECRET.encode(), f"{version}.{body}".encode(), hashlib.sha256).digest()[:16]
    assert tag == base64.urlsafe_b64encode(expected).rstrip(b"=").decode()
    assert body == base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "==")).rstrip(b"=").decode()


@pytest.mark.parametrize("model", ["fmnist-resnet18-eed", 'a "quoted" \\ name', "modèle-ü"])
def test_signed_claims_are_plain_json_for_any_model_name(model):
    signer = AnswerSigner(SECRET.encode(), max_age_s=60)
    token = signer.issue(model, 3, 1, now=1733030000.4567)
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["m"] == model and (claims["e"], claims["l"], claims["t"]) == (3, 1, 1733030000.457)
    assert re.fullmatch(r"[0-9a-f]{16}", claims["n"]), claims["n"]  # a nonce of 64 random bits, in hex
    assert signer.verify(token, now=1733030001.0).model == model
    assert signer.issue(model, 3, 1, now=1733030000.4567) != token  # a fresh nonce every time


def test_nonces_are_unique_per_server_and_differ_between_servers():
    # Feedback is counted once per nonce, so two answers must never share one; replicas sharing
    # the secret must not issue the same sequence either.
    def nonces(signer, n):
        return [
            json.loads(base64.urlsafe_b64decode(signer.issue("m", 1, 0).split(".")[1] + "=="))["n"] for _ in range(n)
        ]

    one, other = AnswerSigner(SECRET.encode(), max_age_s=60), AnswerSigner(SECRET.encode(), max_age_s=60)
    first, second = nonces(one, 5000), nonces(other, 5000)
    assert len(set(first)) == 5000 and all(len(n) == 16 for n in first)
    assert not set(first) & set(second)


def test_a_short_secret_is_refused_at_start(model_dir):
    env = {**os.environ, "EED_FEEDBACK_SECRET": "short", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "serving", "--model-dir", str(model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "feedback_secret" in r.stderr and "16 bytes" in r.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_live_accuracy_recording_rule():
    r = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=60, cwd=RULES_TEST.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr

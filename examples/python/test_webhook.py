"""Unit tests of webhook_receiver.py: the signature check, and the answers of a running
receiver (on 127.0.0.1 port 0) to signed, forged, stale and malformed requests."""

import argparse
import base64
import hashlib
import hmac
import json
import threading
import time
import unittest
import urllib.error
import urllib.request

import webhook_receiver
from webhook_receiver import verify

SECRET = b"Jefe"
BODY = b"what do ya want for nothing?"
# HMAC-SHA256 of "1.what do ya want for nothing?" keyed "Jefe", computed apart from this code:
#   printf '1.what do ya want for nothing?' | openssl dgst -sha256 -hmac Jefe
KNOWN_V1 = "a9049465ce89cfb8e9aac62333abda66f80e3403f51f57f6bae3c3a4485eca38"
HOUR_MS = 3_600_000


def sign(secret: bytes, t_ms: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{t_ms}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t_ms},v1={digest}"


class VerifyTest(unittest.TestCase):
    def test_accepts_the_signature_of_time_dot_body(self):
        self.assertEqual(verify(SECRET, f"t=1,v1={KNOWN_V1}", BODY, 1, HOUR_MS), "")

    def test_refuses_another_body_time_or_secret(self):
        header = f"t=1,v1={KNOWN_V1}"
        self.assertIn("does not match", verify(SECRET, header, BODY + b"!", 1, HOUR_MS))
        self.assertIn("does not match", verify(SECRET, f"t=2,v1={KNOWN_V1}", BODY, 2, HOUR_MS))
        self.assertIn("does not match", verify(b"jefe", header, BODY, 1, HOUR_MS))

    def test_refuses_a_missing_or_malformed_header(self):
        self.assertIn("no rill-signature", verify(SECRET, None, BODY, 1, HOUR_MS))
        self.assertIn("no time", verify(SECRET, f"v1={KNOWN_V1}", BODY, 1, HOUR_MS))
        self.assertIn("does not match", verify(SECRET, "t=1", BODY, 1, HOUR_MS))

    def test_refuses_a_stale_or_future_time(self):
        header = f"t=1,v1={KNOWN_V1}"
        self.assertIn("from now", verify(SECRET, header, BODY, 1 + HOUR_MS + 1, HOUR_MS))
        self.assertIn("from now", verify(SECRET, header, BODY, 1 - HOUR_MS - 1, HOUR_MS))


class ReceiverTest(unittest.TestCase):
    def setUp(self):
        args = argparse.Namespace(max_age_s=300.0, output="json")
        self.server = webhook_receiver.Receiver(("127.0.0.1", 0), SECRET, args)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d/" % self.server.server_address[1]

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def post(self, body: bytes, signature=None) -> int:
        request = urllib.request.Request(self.url, data=body, method="POST")
        if signature is not None:
            request.add_header("rill-signature", signature)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    def envelope(self) -> bytes:
        message = {
            "message_id": "t/0/7",
            "topic": "t",
            "partition": 0,
            "offset": 7,
            "key": base64.b64encode(b"k").decode(),
            "data": base64.b64encode(b"v").decode(),
            "attributes": {},
            "publish_time_ms": 0,
            "delivery_attempt": 1,
        }
        return json.dumps({"subscription": "s", "message": message}).encode()

    def test_acks_a_signed_record_and_refuses_the_rest(self):
        body = self.envelope()
        now_ms = int(time.time() * 1000)
        self.assertEqual(self.post(body, sign(SECRET, now_ms, body)), 200)
        self.assertEqual(self.post(body), 401, "unsigned")
        self.assertEqual(self.post(body, sign(b"wrong", now_ms, body)), 401, "wrong secret")
        stale_ms = now_ms - 301_000
        self.assertEqual(self.post(body, sign(SECRET, stale_ms, body)), 401, "replayed")
        self.assertEqual(self.post(b"{}", sign(SECRET, now_ms, b"{}")), 400, "no envelope")
        self.assertEqual(self.server.counts, {"acked": 1, "refused": 4})


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""A minimal receiver of rim's webhooks (docs/integration.md), standard library only.

Run:   RIM_WEBHOOK_SECRETS=whsec_... python3 webhook_receiver.py 127.0.0.1:8088
Then:  [[webhooks]] name = "app", url = "http://127.0.0.1:8088/rim", secrets = ["whsec_..."]

What every receiver must do, and this one does:
  * verify `webhook-signature` (Standard Webhooks: base64 HMAC-SHA256 over
    "id.timestamp.body" with the secret after `whsec_`, base64-decoded) against
    each of your secrets (two during a rotation), and refuse stale timestamps;
  * treat `webhook-id` as an idempotency key: rim delivers at least once, and
    a repeat carries the same id and the same body bytes;
  * answer 2xx only once the event is safely handled (here: appended to a
    file): rim then moves on; anything else makes rim retry with backoff.
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRETS = [s.strip() for s in os.environ.get("RIM_WEBHOOK_SECRETS", "").split(",") if s.strip()]
TOLERANCE_SECS = 5 * 60
MAX_BODY = 1 << 20
OUT = os.environ.get("RIM_WEBHOOK_OUT", "events.jsonl")


def verify(msg_id: str, timestamp: str, body: bytes, header: str) -> bool:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    claimed = [s[3:] for s in header.split(" ") if s.startswith("v1,")]
    for secret in SECRETS:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, c) for c in claimed):
            return True
    return False


class Handler(BaseHTTPRequestHandler):
    seen = set()  # handled webhook-ids (a real app keeps them in its database)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        if length > MAX_BODY:
            return self.answer(413)
        body = self.rfile.read(length)
        msg_id = self.headers.get("webhook-id", "")
        timestamp = self.headers.get("webhook-timestamp", "0")
        if not verify(msg_id, timestamp, body, self.headers.get("webhook-signature", "")):
            return self.answer(401)
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECS:
            return self.answer(401)
        if msg_id not in Handler.seen:
            event = json.loads(body)
            handle(event)
            with open(OUT, "a") as f:
                f.write(json.dumps(event) + "\n")
            Handler.seen.add(msg_id)
        self.answer(204)

    def answer(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def handle(event):
    """Your code: index, moderate, bill, notify..."""
    kind, data = event["type"], event["data"]
    if kind == "message.created":
        print(f"{event['event_id']}: {data['sender_user_id']} -> "
              f"{data.get('recipient_user_id') or 'group ' + data.get('group_id', '?')}", flush=True)


if __name__ == "__main__":
    if not SECRETS:
        sys.exit("set RIM_WEBHOOK_SECRETS to your endpoint's whsec_... secret(s)")
    host, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8088").rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()

#!/usr/bin/env python3
"""Take one M-Pesa payment through mpesa-wsgi and wait for its outcome.

    PAYMENTS_API_KEY=… python pay.py --order ORDER-1001 --phone 0712345678 --amount 10

Standard library only. The order id is the payment's Idempotency-Key: every retry for
this order (after a network error, or a second run of this script) sends the same key,
so the gateway answers with the payment it already started instead of prompting the
customer again. The outcome is then polled from GET /transactions/<id>, with backoff,
until it is final or the deadline passes.

Exit status: 0 paid; 1 not paid (failed or rejected); 2 the request was refused (fix
it); 3 no final answer before the deadline (run again with the same --order, or look
the id up later; never start a new payment for this order).
"""

import argparse
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request

FINAL = ("succeeded", "failed", "rejected")  # "pending" and "unknown" are not final yet
# Refusals where nothing reached the customer: the same key may be sent again later.
RETRY_LATER = {
    409: ("idempotency_key_in_use", "subscriber_busy"),
    429: ("rate_limited",),
    503: ("gateway_busy", "upstream_unavailable", "ledger_unavailable"),
}
HTTP_TIMEOUT_S = 30  # a push is answered within Daraja's read timeout (15 s) and a bit
FIRST_WAIT_S, MAX_WAIT_S = 1.0, 15.0


class NoAnswer(Exception):
    """The request may or may not have reached the gateway: a network error, or a page
    from something in between (a proxy's 502/504) instead of the gateway's JSON."""


class Gateway:
    def __init__(self, url, api_key):
        self.url, self.api_key = url.rstrip("/"), api_key

    def call(self, method, path, body=None, headers=()):
        """(status, headers, JSON body) of one request, or NoAnswer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json",
            **dict(headers)})
        try:
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
                    return resp.status, resp.headers, json.loads(resp.read())
            except urllib.error.HTTPError as err:  # the gateway's refusal: also an answer
                with err:
                    return err.code, err.headers, json.loads(err.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is OSError
            raise NoAnswer(type(exc).__name__) from exc


def pause(seconds, deadline):
    """Sleep a little over `seconds` (jitter), or return False if that passes the deadline."""
    seconds *= random.uniform(1.0, 1.2)
    if time.monotonic() + seconds > deadline:
        return False
    time.sleep(seconds)
    return True


def start_payment(gateway, order, payment, deadline):
    """POST /stkpush with the order's Idempotency-Key until the gateway takes it: the
    transaction (202); exits on a refusal or at the deadline."""
    wait = FIRST_WAIT_S
    while True:
        try:
            status, headers, body = gateway.call("POST", "/stkpush", payment,
                                                 {"Idempotency-Key": order})
        except NoAnswer as exc:  # did it arrive? The same key makes the retry safe.
            note(f"no answer ({exc}); retrying with the same Idempotency-Key")
            if not pause(wait, deadline):
                give_up(f"no answer from the gateway; run again with --order {order}"
                        " (the same key: no second prompt)")
            wait = min(wait * 2, MAX_WAIT_S)
            continue
        if status == 202:
            if headers.get("Idempotent-Replayed") == "true":
                note(f"order {order} already has payment {body['id']}: following it")
            return body
        error = body.get("error", {})
        if error.get("code") in RETRY_LATER.get(status, ()):
            retry_after = float(headers.get("Retry-After") or wait)
            note(f"{status} {error['code']}: retrying in {retry_after:g} s")
            if not pause(retry_after, deadline):
                give_up(f"still refused at the deadline: {error['code']}")
            continue
        print(f"refused: {status} {error.get('code')}: {error.get('message')}")
        sys.exit(2)


def wait_for_outcome(gateway, tx, deadline):
    """Poll GET /transactions/<id> with backoff until the status is final or the
    deadline passes; the last transaction seen."""
    wait = FIRST_WAIT_S
    while tx["status"] not in FINAL:
        note(f"{tx['id']} {tx['status']}; asking again in about {wait:g} s")
        if not pause(wait, deadline):
            break
        wait = min(wait * 1.5, MAX_WAIT_S)
        try:
            status, _, body = gateway.call("GET", f"/transactions/{tx['id']}")
        except NoAnswer as exc:
            note(f"no answer ({exc}) while polling")
            continue
        if status != 200:
            error = body.get("error", {})
            print(f"refused: {status} {error.get('code')}: {error.get('message')}")
            sys.exit(2)
        tx = body
    return tx


def note(line):
    print(line, file=sys.stderr, flush=True)


def give_up(line):
    print(line)
    sys.exit(3)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Start an M-Pesa STK push through mpesa-wsgi and wait for its outcome."
        " The API key is read from PAYMENTS_API_KEY.")
    parser.add_argument("--order", required=True,
                        help="your order id, sent as the Idempotency-Key (reuse it to retry)")
    parser.add_argument("--phone", required=True, help="the customer's phone, e.g. 0712345678")
    parser.add_argument("--amount", required=True, type=int, help="whole shillings")
    parser.add_argument("--reference", help="shown to the customer (at most 12 characters)")
    parser.add_argument("--description", help="at most 13 characters")
    parser.add_argument("--url", default=os.environ.get("PAYMENTS_URL", "http://127.0.0.1:8000"),
                        help="the gateway's base URL (PAYMENTS_URL; default %(default)s)")
    parser.add_argument("--wait", type=float, default=180, metavar="SECONDS",
                        help="stop waiting for the outcome after this long (default 180)")
    args = parser.parse_args(argv)
    api_key = os.environ.get("PAYMENTS_API_KEY", "")
    if not api_key:
        parser.error("set PAYMENTS_API_KEY to your gateway API key")
    if not re.fullmatch(r"[!-~]{1,255}", args.order):
        parser.error("--order must be 1 to 255 printable ASCII characters, no spaces")
    payment = {"phone": args.phone, "amount": args.amount}
    for field in ("reference", "description"):
        if getattr(args, field) is not None:
            payment[field] = getattr(args, field)
    deadline = time.monotonic() + args.wait
    gateway = Gateway(args.url, api_key)
    tx = start_payment(gateway, args.order, payment, deadline)
    tx = wait_for_outcome(gateway, tx, deadline)
    line = f"{tx['status']} {tx['id']} amount={tx['amount']} phone={tx['phone']}"
    if tx["status"] == "succeeded":
        print(f"{line} receipt={tx['receipt']}")
        return 0
    if tx["status"] in FINAL:
        print(f"{line} reason={tx['reason']}")
        return 1
    give_up(f"{line}: not final yet; run again with --order {args.order} to keep waiting"
            " (never start a new payment for this order)")


if __name__ == "__main__":
    sys.exit(main())

"""The payment service: what a request, a callback or a background pass does.

`services` builds everything once, in named steps; `payments` holds the flows the web
layers call (start a payment, read and list them, receive a callback, the operator's
webhook calls, /metrics); `auth`, `wire` (errors and JSON), `admission` (push slots,
rate limits) and `monitoring` (/health, access lines) serve them. `daraja` is the only
code that talks to Safaricom; `settlement` applies an STK result, whoever brings it;
`reconciler` and `webhooks` are the background workers; `fleet` keeps what several
hosts share. It stores nothing itself: that is `mpesa_ledger`'s.
"""

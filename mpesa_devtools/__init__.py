"""Tools for developing against the gateway, never for serving it.

`simulator`: a Daraja double faithful to Safaricom's documented behaviour
(`python -m mpesa_devtools.simulator --port 8001`), its initiator APIs in
`sim_initiator`; `receiver`: the demo's webhook
endpoint; `demo`: the demo's settings. Only the command line imports this package (for
`--demo`); the gateway and the ledger never do.
"""

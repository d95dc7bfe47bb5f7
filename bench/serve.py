"""Serve one benchmark variant under waitress with the gateway's settings.

`python bench/serve.py raw|flask|falcon|hello`: builds the variant from the same
environment (so threads, pool size, ledger and logging are identical) and serves it
with waitress on GATEWAY_HOST:GATEWAY_PORT with GATEWAY_THREADS threads, logging at
LOG_LEVEL to stderr. Pinning to a CPU is the runner's job (taskset).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import config  # noqa: E402


def factory(variant):
    if variant == "raw":
        import mpesa_wsgi
        return mpesa_wsgi.create_app  # the raw gateway, as `python mpesa_wsgi.py` builds it
    if variant == "flask":
        from bench import flask_app
        return flask_app.create_app
    if variant == "falcon":
        from bench import falcon_app
        return falcon_app.create_app
    if variant == "hello":
        from bench import hello
        return lambda cfg: hello.app
    raise SystemExit(f"unknown variant {variant}")


def main():
    import waitress

    cfg = config.load_config(os.environ)
    cli.configure_logging(cfg)
    app = factory(sys.argv[1])(cfg)
    waitress.serve(app, host=cfg.host, port=cfg.port, _quiet=True, **cli.waitress_settings(cfg))


if __name__ == "__main__":
    main()

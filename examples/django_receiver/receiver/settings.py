"""Settings of the example receiver: one Django project that is also its only app.

Everything a deployment changes comes from the environment:
  WEBHOOK_SECRET        the endpoint's signing secret, whsec_… (the gateway's
                        GATEWAY_WEBHOOK_SECRETS entry for your API key's name)
  DJANGO_DB             the SQLite file that keeps the events (default: db.sqlite3 here)
  DJANGO_SECRET_KEY     Django's own key (required unless DJANGO_DEBUG=1)
  DJANGO_DEBUG          1 for local development
  DJANGO_ALLOWED_HOSTS  comma-separated host names besides 127.0.0.1, localhost, ::1
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or (
    "django-insecure-example-only" if DEBUG else "")  # empty: Django refuses to start
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"] + [
    h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]

MPESA_WEBHOOK_SECRET = os.environ.get("WEBHOOK_SECRET", "")

INSTALLED_APPS = ["receiver"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",  # on for every view but the webhook's
]
ROOT_URLCONF = "receiver.urls"
WSGI_APPLICATION = "receiver.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB") or BASE_DIR / "db.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "Africa/Nairobi"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"receiver": {"handlers": ["console"], "level": "INFO"}},
}

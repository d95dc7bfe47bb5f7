"""WSGI entry point for a real server: gunicorn receiver.wsgi (or waitress-serve)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "receiver.settings")
application = get_wsgi_application()

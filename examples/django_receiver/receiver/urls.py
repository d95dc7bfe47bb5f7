from django.urls import path

from receiver import views

urlpatterns = [
    # No trailing slash: the gateway posts to the URL exactly as configured and never
    # follows a redirect (APPEND_SLASH would answer 301).
    path("mpesa/events", views.payment_events),
]

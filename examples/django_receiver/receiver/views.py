import functools
import logging

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from receiver.models import PaymentEvent

log = logging.getLogger(__name__)


@functools.cache
def webhook():
    return Webhook(settings.MPESA_WEBHOOK_SECRET)  # raises if WEBHOOK_SECRET is unset


@csrf_exempt  # the signature is this endpoint's protection; every other view keeps CSRF
@require_POST
def payment_events(request):
    """Verify, record once, answer 204. The work (mark the order paid, email the
    customer) happens after, from the recorded row: `manage.py process_events`."""
    try:
        event = webhook().verify(request.body, request.headers)  # id, timestamp (5 min), HMAC
    except (WebhookVerificationError, ValueError):  # ValueError: a malformed header or body
        log.warning("webhook refused: the signature did not verify")
        return HttpResponse(status=400)
    webhook_id = request.headers["webhook-id"]
    data = event.get("data") if isinstance(event, dict) else None
    # payment.* events carry the payment (data.id); receipt.received a receipt (data.receipt).
    if not (isinstance(data, dict) and isinstance(data.get("id", data.get("receipt")), str)
            and isinstance(event.get("type"), str)):
        log.warning("webhook %s refused: signed, but not an event of the gateway's", webhook_id)
        return HttpResponse(status=400)  # never recorded, so never processed
    tx_id = data.get("id") or data.get("transaction_id") or ""  # a receipt: its payment
    _, created = PaymentEvent.objects.get_or_create(webhook_id=webhook_id, defaults={
        "type": event["type"], "transaction_id": tx_id, "status": data.get("status") or "",
        "receipt": data.get("receipt"), "payload": event})
    if created:
        log.info("webhook %s recorded: %s %s", webhook_id, event["type"], tx_id or "-")
    else:
        log.info("webhook %s already recorded: acknowledged, not processed again", webhook_id)
    return HttpResponse(status=204)

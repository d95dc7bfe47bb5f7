from django.db import models


class PaymentEvent(models.Model):
    """One webhook event from the gateway, kept once per webhook-id: the gateway delivers
    at least once, so a redelivery finds its row here and is not processed again."""

    webhook_id = models.CharField(max_length=64, primary_key=True)  # msg_…, same on retries
    type = models.CharField(max_length=32)  # payment.succeeded | payment.failed | payment.unknown
    transaction_id = models.CharField(max_length=64)  # data.id: the gateway's tx_…
    status = models.CharField(max_length=16)
    receipt = models.CharField(max_length=32, null=True)  # the M-Pesa receipt when paid
    payload = models.JSONField()  # the whole event, as signed
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True)  # set by `manage.py process_events`

    class Meta:
        db_table = "payment_events"
        indexes = [models.Index(fields=["processed_at", "received_at"])]

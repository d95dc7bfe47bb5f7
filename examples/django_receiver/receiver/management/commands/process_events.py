from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from receiver.models import PaymentEvent


class Command(BaseCommand):
    help = ("Do the work for each recorded payment event not processed yet, oldest first,"
            " once each (run it from cron or a worker loop).")

    def handle(self, **options):
        for event in PaymentEvent.objects.filter(processed_at=None).order_by("received_at"):
            with transaction.atomic():
                # Claim the row: two workers running at once never process one event twice.
                claimed = PaymentEvent.objects.filter(
                    pk=event.pk, processed_at=None).update(processed_at=timezone.now())
                if claimed:
                    self.fulfil(event)

    def fulfil(self, event):
        # Your shop's work goes here: mark the order paid (event.status == "succeeded"),
        # release it for a new attempt ("failed"), or keep waiting ("unknown"). Several
        # events of one payment may arrive out of order: trust payload["timestamp"] (the
        # payment's updated_at), or GET /transactions/<id> for the latest state.
        self.stdout.write(f"processed {event.type} {event.transaction_id}"
                          f" status={event.status} receipt={event.receipt or '-'}")

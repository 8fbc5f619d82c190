"""Outbound webhooks: events published with the change they report, delivered signed through the outbox.

Each event is published in the transaction of its change and delivered at least once, through
the outbox (kind `webhook.deliver`), to the subscribed URLs.
"""

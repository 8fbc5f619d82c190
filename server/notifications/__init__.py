"""Outbound webhooks: events published in the transaction of the change they report, delivered
signed, at least once, through the outbox (kind `webhook.deliver`), to the subscribed URLs.
"""

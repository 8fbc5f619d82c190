-- Outbound webhooks (issue 12): who hears about which events, and where each delivery stands.
--
-- publish() (server.notifications.events) writes one event and one delivery per subscription
-- of its type in the transaction of the change it reports, and an outbox job of kind
-- 'webhook.deliver' per delivery (subject: the delivery id), so an event is delivered exactly
-- when its change committed. The job's handler POSTs it and records each attempt here.
CREATE TABLE webhook_subscriptions (
    id          text        PRIMARY KEY,  -- the {webhook_subscription} of its name, "ws_<hex>"
    url         text        NOT NULL,
    -- The HMAC key of the signatures: needed in clear to sign, so readable by whoever reads
    -- this table (as the database's other secrets, e.g. the page token key). Never returned.
    secret      text        NOT NULL,
    event_types text[]      NOT NULL CHECK (cardinality(event_types) > 0),
    description text        NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL
);
CREATE INDEX webhook_subscriptions_by_time ON webhook_subscriptions (create_time, id);

-- One published event: its id is what receivers deduplicate on. Stored only when at least one
-- subscription wanted it.
CREATE TABLE webhook_events (
    id          text        PRIMARY KEY,  -- "evt_<hex>"
    type        text        NOT NULL,
    data        jsonb       NOT NULL,
    create_time timestamptz NOT NULL
);

-- One event to one subscription. Deleting a subscription deletes its deliveries; their outbox
-- jobs then find nothing to do.
CREATE TABLE webhook_deliveries (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id   text        NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    event_id          text        NOT NULL REFERENCES webhook_events (id),
    state             text        NOT NULL DEFAULT 'pending'
                                  CHECK (state IN ('pending', 'delivered', 'failed')),
    attempt_count     integer     NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    next_attempt_time timestamptz,  -- pending only
    create_time       timestamptz NOT NULL,
    expire_time       timestamptz NOT NULL,  -- the last attempt is made by then
    deliver_time      timestamptz,
    UNIQUE (subscription_id, event_id)
);
-- ListWebhookDeliveries: a subscription's deliveries, newest first.
CREATE INDEX webhook_deliveries_by_subscription ON webhook_deliveries (subscription_id, id DESC);
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (event_id);

-- Every POST of a delivery (22 at most: the backoff reaches 3 days in that many).
CREATE TABLE webhook_delivery_attempts (
    delivery_id  bigint      NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,  -- 1, 2, ...
    attempt_time timestamptz NOT NULL,
    status_code  integer     NOT NULL DEFAULT 0,  -- 0: no HTTP answer
    error        text        NOT NULL DEFAULT '',
    PRIMARY KEY (delivery_id, attempt)
);

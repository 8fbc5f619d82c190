-- Stripe webhooks and dunning (server/payments): every delivered event stored once, the
-- payments Stripe names instead of invoices, the dunning anchor, and each tenant's standing.

-- One row per Stripe event id: a redelivery finds its row and changes nothing. `outcome`
-- says what the event did: applied (changed a payment), unchanged (older news, or a state
-- it cannot leave), unmatched (no Tally invoice found), ignored (a type Tally does not act on).
CREATE TABLE stripe_events (
    id           text        PRIMARY KEY,
    type         text        NOT NULL,
    object_id    text        NOT NULL,
    created_time timestamptz NOT NULL,  -- when Stripe created the event
    receive_time timestamptz NOT NULL,
    invoice_id   text        REFERENCES invoices (id),
    outcome      text        NOT NULL CHECK (outcome IN ('applied', 'unchanged', 'unmatched', 'ignored')),
    payload      jsonb       NOT NULL
);
CREATE INDEX stripe_events_invoice ON stripe_events (invoice_id, created_time) WHERE invoice_id IS NOT NULL;

-- Charges and payment intents of an invoice, learned from its events: a dispute names only
-- its charge, and charges of recent API versions no longer name their invoice.
CREATE TABLE stripe_payment_refs (
    ref        text PRIMARY KEY,
    invoice_id text NOT NULL REFERENCES invoices (id)
);

-- The time of the first failed attempt: the dunning schedule's offsets count from it.
ALTER TABLE invoice_payments ADD COLUMN first_failure_time timestamptz;

-- A tenant's collection status as last recorded (and audited when it changed); a tenant
-- without a row is in good standing.
CREATE TABLE tenant_collections (
    tenant_id   text        PRIMARY KEY,
    state       text        NOT NULL CHECK (state IN ('good_standing', 'past_due', 'delinquent')),
    update_time timestamptz NOT NULL
);

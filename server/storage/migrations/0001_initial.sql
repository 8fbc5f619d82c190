-- The rate card: one row per price change of a usage type. A price holds from
-- effective_from until the next row of the same usage type.
CREATE TABLE rates (
    service        text        NOT NULL,
    usage_type     text        NOT NULL,
    effective_from timestamptz NOT NULL CHECK (effective_from = date_trunc('hour', effective_from, 'UTC')),
    unit_price     numeric     NOT NULL CHECK (unit_price >= 0),
    currency       text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, usage_type, effective_from)
);

-- Every usage event recorded, once. The primary key is the idempotency key: a
-- second insert of the same (tenant_id, event_id) does nothing.
CREATE TABLE usage_events (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    service     text        NOT NULL,
    usage_type  text        NOT NULL,
    quantity    numeric     NOT NULL CHECK (quantity >= 0),
    event_time  timestamptz NOT NULL,
    dimensions  jsonb       NOT NULL DEFAULT '{}',
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id)
);

-- Hourly totals per tenant, usage type and set of dimensions, updated in the same
-- transaction as the events they count. Summaries and invoices read only these,
-- so their cost grows with the length of the range, not with the number of events.
CREATE TABLE usage_rollups (
    tenant_id   text        NOT NULL,
    hour        timestamptz NOT NULL,
    service     text        NOT NULL,
    usage_type  text        NOT NULL,
    dimensions  jsonb       NOT NULL,
    quantity    numeric     NOT NULL,
    event_count bigint      NOT NULL,
    PRIMARY KEY (tenant_id, hour, service, usage_type, dimensions)
);
-- For summaries over every tenant of a time range.
CREATE INDEX usage_rollups_hour ON usage_rollups (hour);

CREATE TABLE invoices (
    id           text        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    currency     text        NOT NULL,
    total        numeric     NOT NULL,
    status       text        NOT NULL CHECK (status IN ('draft')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (period_start < period_end),
    -- One invoice per tenant and period; also the index for listing newest first.
    UNIQUE (tenant_id, period_start, period_end)
);

CREATE TABLE invoice_line_items (
    invoice_id  text    NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    position    integer NOT NULL,
    service     text    NOT NULL,
    usage_type  text    NOT NULL,
    quantity    numeric NOT NULL,
    unit_price  numeric NOT NULL,
    amount      numeric NOT NULL,
    event_count bigint  NOT NULL,
    PRIMARY KEY (invoice_id, position)
);

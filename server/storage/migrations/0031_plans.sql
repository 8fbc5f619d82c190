-- Plans (named, versioned sets of charges in one currency), tenants' billing profiles and
-- the history of which plan each tenant is on. The default plan, 'default', is the rate
-- card (table rates) and has no rows here.
CREATE TABLE plans (
    id           text        PRIMARY KEY,
    display_name text        NOT NULL,
    currency     text        NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now()
);

-- A version holds from effective_from (a whole hour) until the next version of its plan.
CREATE TABLE plan_versions (
    plan_id        text        NOT NULL REFERENCES plans (id),
    version        integer     NOT NULL CHECK (version >= 1),
    effective_from timestamptz NOT NULL CHECK (effective_from = date_trunc('hour', effective_from, 'UTC')),
    charges        jsonb       NOT NULL,
    minimum        numeric     NOT NULL DEFAULT 0 CHECK (minimum >= 0),
    create_time    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, version),
    UNIQUE (plan_id, effective_from)
);

CREATE TABLE billing_profiles (
    tenant_id       text        PRIMARY KEY,
    display_name    text        NOT NULL,
    email           text        NOT NULL,
    currency        text        NOT NULL,
    anchor_day      integer     NOT NULL CHECK (anchor_day BETWEEN 1 AND 31),
    billing_start   timestamptz NOT NULL CHECK (billing_start = date_trunc('hour', billing_start, 'UTC')),
    tax_percentage  numeric     CHECK (tax_percentage BETWEEN 0 AND 100),
    spend_threshold numeric     CHECK (spend_threshold > 0),
    overrides       jsonb       NOT NULL DEFAULT '[]',
    -- End of the last closed period; billing_start before the first close. The period
    -- closer takes profiles whose next_close_time has passed, FOR UPDATE SKIP LOCKED.
    closed_until    timestamptz NOT NULL,
    next_close_time timestamptz NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_profiles_next_close ON billing_profiles (next_close_time);

CREATE TABLE tenant_plans (
    tenant_id      text        NOT NULL REFERENCES billing_profiles (tenant_id),
    effective_from timestamptz NOT NULL CHECK (effective_from = date_trunc('hour', effective_from, 'UTC')),
    plan_id        text        NOT NULL,
    PRIMARY KEY (tenant_id, effective_from)
);

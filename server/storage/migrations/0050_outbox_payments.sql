-- The transactional outbox and the payment state of invoices (issue 12).
--
-- A job is one kind of work on one subject (an invoice id, a credit note id, a delivery id),
-- written in the same transaction as the change that calls for it, so the work is never lost
-- and never done for a change that rolled back. Workers (server.payments.outbox) claim due
-- jobs with FOR UPDATE SKIP LOCKED, so several `tally serve` processes never run one job at
-- the same time; `step` records how far a job got, so a restart resumes there.
CREATE TABLE outbox_jobs (
    id                bigserial   PRIMARY KEY,
    kind              text        NOT NULL,
    subject           text        NOT NULL,
    step              text        NOT NULL DEFAULT '',
    state             text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'stopped')),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_time timestamptz NOT NULL,
    last_error        text,
    payload           jsonb       NOT NULL DEFAULT '{}',
    created_time      timestamptz NOT NULL DEFAULT now(),
    updated_time      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, subject)
);
-- The workers' one query: pending jobs in the order they fall due.
CREATE INDEX outbox_jobs_due ON outbox_jobs (next_attempt_time, id) WHERE state = 'pending';

-- Where collecting a finalized invoice stands. 'simulated': no Stripe key was configured when
-- it was pushed; the others mirror Stripe's invoice (pending: not yet open at Stripe).
CREATE TABLE invoice_payments (
    invoice_id        text        PRIMARY KEY REFERENCES invoices (id),
    state             text        NOT NULL CHECK (state IN ('simulated', 'pending', 'open', 'paid', 'failed',
                                                            'action_required', 'uncollectible', 'void')),
    stripe_invoice_id text        UNIQUE,
    attempt_count     integer     NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    next_attempt_time timestamptz,
    last_failure      text,
    updated_time      timestamptz NOT NULL DEFAULT now()
);

-- The tenant's Stripe customer, created once by the first push and reused by every later one.
ALTER TABLE billing_profiles ADD COLUMN stripe_customer_id text;

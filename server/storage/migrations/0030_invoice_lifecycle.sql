-- The invoice lifecycle: draft -> finalized -> paid | void | uncollectible, numbered
-- documents, frozen lines, credit notes.

ALTER TABLE invoices DROP CONSTRAINT invoices_status_check;
ALTER TABLE invoices ADD CONSTRAINT invoices_status_check
    CHECK (status IN ('draft', 'finalized', 'paid', 'void', 'uncollectible'));
ALTER TABLE invoices
    ADD COLUMN kind               text        NOT NULL DEFAULT 'final' CHECK (kind IN ('final', 'interim')),
    ADD COLUMN number             text,
    ADD COLUMN issuer             text,
    ADD COLUMN finalize_time      timestamptz,
    ADD COLUMN paid_time          timestamptz,
    ADD COLUMN void_time          timestamptz,
    ADD COLUMN uncollectible_time timestamptz,
    -- The issuer and customer printed on the document, frozen when it is finalized.
    ADD COLUMN parties            jsonb,
    -- The plans that priced it ('default' is the rate card): a rate or plan change may not
    -- take effect inside a finalized period of a plan it priced.
    ADD COLUMN plan_ids           text[]      NOT NULL DEFAULT '{}',
    -- Drafts have no number; everything billed has one (a voided draft never got one).
    ADD CHECK (status <> 'draft' OR number IS NULL),
    ADD CHECK (status IN ('draft', 'void') OR number IS NOT NULL);

-- One final invoice per tenant and period, plus its interim ones; a voided invoice frees its
-- period. Overlaps are refused by the service under the tenant's invoice lock.
ALTER TABLE invoices DROP CONSTRAINT invoices_tenant_id_period_start_period_end_key;
CREATE UNIQUE INDEX invoices_one_final_per_period
    ON invoices (tenant_id, period_start, period_end) WHERE kind = 'final' AND status <> 'void';
CREATE INDEX invoices_tenant_period ON invoices (tenant_id, period_start, id);
-- A number is unique within its issuer's documents (it is unique within its sequence).
CREATE UNIQUE INDEX invoices_number ON invoices (issuer, number);

ALTER TABLE invoice_line_items
    ALTER COLUMN unit_price DROP NOT NULL,
    ADD COLUMN kind         text NOT NULL DEFAULT 'usage'
        CHECK (kind IN ('usage', 'flat_fee', 'minimum', 'adjustment', 'tax')),
    ADD COLUMN description  text NOT NULL DEFAULT '',
    ADD COLUMN charge_key   text NOT NULL DEFAULT '',
    -- Usage and fee lines: the part of the period they price; adjustments: the period corrected.
    ADD COLUMN period_start timestamptz,
    ADD COLUMN period_end   timestamptz,
    ADD COLUMN tiers        jsonb NOT NULL DEFAULT '[]';

-- A finalized invoice never changes: its amounts, period and lines are frozen. Only its
-- status (and the time of that status) may move on, along the lifecycle.
CREATE FUNCTION invoices_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'draft' AND (
        NEW.total IS DISTINCT FROM OLD.total OR NEW.currency IS DISTINCT FROM OLD.currency
        OR NEW.period_start IS DISTINCT FROM OLD.period_start OR NEW.period_end IS DISTINCT FROM OLD.period_end
        OR NEW.number IS DISTINCT FROM OLD.number OR NEW.issuer IS DISTINCT FROM OLD.issuer OR NEW.parties IS DISTINCT FROM OLD.parties
        OR NEW.tenant_id IS DISTINCT FROM OLD.tenant_id OR NEW.status = 'draft') THEN
        RAISE EXCEPTION 'invoice % is finalized and cannot change', OLD.id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER invoices_frozen BEFORE UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION invoices_frozen();
CREATE FUNCTION invoices_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'draft' THEN
        RAISE EXCEPTION 'invoice % is finalized and cannot be deleted', OLD.id;
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER invoices_no_delete BEFORE DELETE ON invoices FOR EACH ROW EXECUTE FUNCTION invoices_no_delete();

CREATE FUNCTION invoice_lines_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    invoice text := CASE WHEN TG_OP = 'INSERT' THEN NEW.invoice_id ELSE OLD.invoice_id END;
BEGIN
    IF EXISTS (SELECT 1 FROM invoices WHERE id = invoice AND status <> 'draft') THEN
        RAISE EXCEPTION 'invoice % is finalized: its lines cannot change', invoice;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER invoice_lines_frozen BEFORE INSERT OR UPDATE OR DELETE ON invoice_line_items
    FOR EACH ROW EXECUTE FUNCTION invoice_lines_frozen();

-- Gap-free numbering: one counter row per issuer and expanded prefix (e.g. 'TALLY-2026-'),
-- taken with UPDATE ... RETURNING inside the finalizing transaction. The row lock makes
-- concurrent finalizations (from any process) take numbers one at a time, and a rollback
-- gives its number back, so the committed numbers never skip or repeat.
CREATE TABLE document_sequences (
    issuer      text   NOT NULL,
    prefix      text   NOT NULL,
    last_number bigint NOT NULL DEFAULT 0 CHECK (last_number >= 0),
    PRIMARY KEY (issuer, prefix)
);

-- Credit notes: a whole or partial credit against a finalized invoice, with a reason;
-- numbered like invoices, in their own sequence. Never changed or deleted.
CREATE TABLE credit_notes (
    id          text        PRIMARY KEY,
    tenant_id   text        NOT NULL,
    invoice_id  text        NOT NULL REFERENCES invoices (id),
    issuer      text        NOT NULL,
    number      text        NOT NULL,
    currency    text        NOT NULL,
    amount      numeric     NOT NULL CHECK (amount > 0),
    reason      text        NOT NULL,
    parties     jsonb       NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (issuer, number)
);
CREATE INDEX credit_notes_tenant ON credit_notes (tenant_id, create_time, id);
CREATE INDEX credit_notes_invoice ON credit_notes (invoice_id);

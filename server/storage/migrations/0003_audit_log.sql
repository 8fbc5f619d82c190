-- The audit trail of money rules: rate changes and invoice generation, one row per
-- committed change, written in the same transaction as the change. Append-only: the
-- triggers below refuse UPDATE, DELETE and TRUNCATE, even for the table's owner.
CREATE TABLE audit_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_time  timestamptz NOT NULL DEFAULT now(),
    principal   text        NOT NULL,
    request_id  text        NOT NULL,
    action      text        NOT NULL,
    tenant_id   text        NOT NULL,  -- '' for changes to the shared rate card
    resource    text        NOT NULL,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id);
CREATE INDEX audit_events_time ON audit_events (event_time);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END
$$;
CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Secrets that every Tally process on this database must share, e.g. the key that signs
-- page tokens (a token issued by one process is accepted by any other). Each is created
-- once, by the first process that needs it (INSERT ... ON CONFLICT DO NOTHING), and read
-- back by all. Whoever can read this table can forge page tokens, which only lets them
-- page through what their bearer token already lets them read.
CREATE TABLE shared_keys (
    name       text        PRIMARY KEY,
    key        bytea       NOT NULL CHECK (length(key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

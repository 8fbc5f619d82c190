-- Rate-limit buckets and stream counts shared by every Tally process on this database
-- (server.auth.sharing). UNLOGGED: they are rewritten several times a second and worth
-- nothing after a crash, when every bucket simply starts full again.

-- One token bucket per limited key (e.g. "events:tenant:acme"): `tokens` as of `updated`
-- (seconds since the epoch), refilled at `rate` per second up to `rate` (one second's worth).
-- A float is exact enough here: these are rates, not money or usage.
CREATE UNLOGGED TABLE rate_limit_buckets (
    key text PRIMARY KEY,
    rate double precision NOT NULL,
    tokens double precision NOT NULL,
    updated double precision NOT NULL
);

-- Open streams per principal, per server process; rows of a process not `seen` lately are ignored.
CREATE UNLOGGED TABLE stream_slots (
    worker text NOT NULL,
    principal text NOT NULL,
    open integer NOT NULL,
    seen double precision NOT NULL,
    PRIMARY KEY (worker, principal)
);

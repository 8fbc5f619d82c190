-- Request ids (AIP-155): the first response of each mutating call that carried a request_id,
-- keyed by who sent it to which method, so that a retry is answered with it instead of
-- applying the change again. Written in the same transaction as the change, so a change and
-- its key commit (or roll back) together. `fingerprint` is a hash of the request, to refuse
-- the reuse of a request_id for another request. Rows are kept indefinitely: mutating
-- calls other than usage reports are rare administrative ones.
CREATE TABLE request_ids (
    principal   text        NOT NULL,
    method      text        NOT NULL,
    request_id  text        NOT NULL,
    fingerprint bytea       NOT NULL,
    response    bytea       NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, method, request_id)
);

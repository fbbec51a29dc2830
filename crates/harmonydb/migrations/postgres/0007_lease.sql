-- Leases for cluster-wide chores that one node at a time should do (history retention). A
-- holder takes a lease by upserting its row when the row is free, expired or already its own,
-- and keeps it by renewing `expires` before each step; a holder that dies simply lets it
-- expire. Expiry uses the database server's clock, like machine liveness. A plain row rather
-- than an advisory lock, which YugabyteDB and CockroachDB do not have.
CREATE TABLE harmony_lease (
    name     VARCHAR(64)  PRIMARY KEY,
    holder   VARCHAR(300) NOT NULL,
    expires  TIMESTAMPTZ  NOT NULL
);

-- Leases for cluster-wide chores that one node at a time should do (history retention). A
-- holder takes a lease by upserting its row when the row is free, expired or already its own,
-- and keeps it by renewing `expires` before each step; a holder that dies simply lets it
-- expire. Expiry uses the database's clock, like machine liveness.
CREATE TABLE harmony_lease (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    expires  TEXT NOT NULL
);

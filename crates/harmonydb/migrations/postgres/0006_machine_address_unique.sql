-- A node's --listen address is its identity: two live machines must never share one. The
-- registration transaction replaces a row with the same address only when that row's heartbeat
-- is older than dead-after; this unique index closes the race of two nodes starting with one
-- address at the same moment (the second insert fails and that node refuses to start).
--
-- Earlier versions deleted every row with the node's address at registration, so duplicates can
-- only come from that race; keep the newest row of each address.
DELETE FROM harmony_machines
WHERE id NOT IN (SELECT max(id) FROM harmony_machines GROUP BY host_and_port);
DROP INDEX harmony_machines_host_and_port;
CREATE UNIQUE INDEX harmony_machines_host_and_port ON harmony_machines (host_and_port);

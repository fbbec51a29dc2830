-- Follow-ups waiting to be made. The completion transaction of a task whose type has
-- registered followers (rows of harmony_task_follow) inserts one row per follower here; the
-- follower consumes a row and adds its tasks in one transaction, so each completion leads to
-- exactly one make() cluster-wide. (A cursor over history ids alone could skip a row that a
-- slower transaction commits with a lower id.)
CREATE TABLE harmony_task_follow_queue (
    id          BIGSERIAL PRIMARY KEY,
    from_type   VARCHAR(16) NOT NULL,
    to_type     VARCHAR(16) NOT NULL,
    task_id     BIGINT      NOT NULL,
    history_id  BIGINT      NOT NULL
);
CREATE INDEX harmony_task_follow_queue_pair ON harmony_task_follow_queue (from_type, to_type, id);

-- Bids of nodes that would preempt running work to start a time-sensitive task: after a short
-- window the lowest cost (total runtime of the victims) wins, ties to the lower machine id.
CREATE TABLE harmony_task_preempt_bid (
    task_id     BIGINT NOT NULL REFERENCES harmony_task (id) ON DELETE CASCADE,
    machine_id  BIGINT NOT NULL REFERENCES harmony_machines (id) ON DELETE CASCADE,
    cost_ms     BIGINT NOT NULL,
    PRIMARY KEY (task_id, machine_id)
);
CREATE INDEX harmony_task_preempt_bid_machine ON harmony_task_preempt_bid (machine_id);

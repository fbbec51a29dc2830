-- Arguments of tasks added from the CLI or by command task types, written in the same
-- transaction as the task row. No foreign key: arguments outlive the harmony_task row (which
-- is deleted on completion) so that `task show` and `task restart` still find them.
CREATE TABLE harmony_task_args (
    task_id  BIGINT NOT NULL,
    key      TEXT   NOT NULL,
    value    TEXT   NOT NULL,
    PRIMARY KEY (task_id, key)
);

-- Every physical run of a built-in test/benchmark task (bench_noop, bench_sleep, bench_fail),
-- written by the task itself at start and end, outside the engine's fencing, so that an
-- outside checker can prove no task ran twice at once and none was lost.
CREATE TABLE harmony_test_attempt (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT      NOT NULL,
    machine_id  BIGINT      NOT NULL,
    started     TIMESTAMPTZ NOT NULL,
    ended       TIMESTAMPTZ,
    -- Start in microseconds since the epoch, for latency measurements finer than the
    -- millisecond timestamp columns.
    started_us  BIGINT      NOT NULL DEFAULT 0
);
CREATE INDEX harmony_test_attempt_task ON harmony_test_attempt (task_id);

-- Why waiting work does not start, per node and task type: each node writes the reason its
-- scheduler holds for every type with waiting tasks that it is not claiming (at most once a
-- second, and only on change), and deletes it when the type runs again. Rows of a machine go
-- with it (reaped or shut down); readers also ignore machines past their heartbeat.
CREATE TABLE harmony_task_blocked (
    machine_id  BIGINT       NOT NULL REFERENCES harmony_machines (id) ON DELETE CASCADE,
    task_name   VARCHAR(16)  NOT NULL,
    reason      VARCHAR(32)  NOT NULL,
    detail      TEXT         NOT NULL,
    since       TIMESTAMPTZ  NOT NULL,
    PRIMARY KEY (machine_id, task_name)
);
CREATE INDEX harmony_task_blocked_name ON harmony_task_blocked (task_name);

-- Task types paused cluster-wide by an operator: no node polls or claims their tasks while a
-- row exists; running ones finish.
CREATE TABLE harmony_task_pause (
    task_name  VARCHAR(16)   PRIMARY KEY,
    paused_at  TIMESTAMPTZ   NOT NULL,
    paused_by  VARCHAR(300)  NOT NULL
);

-- Harmony schema, SQLite dialect. Mirrors postgres/0001_init.sql table for table.
-- Timestamps are TEXT in exactly one format, UTC 'YYYY-MM-DD HH:MM:SS.fff'; booleans are 0/1.
-- Ids use AUTOINCREMENT so that an id is never reused after its row is deleted: task ids
-- outlive their rows in history, and machine ids fence ownership per process start.

CREATE TABLE harmony_machines (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    last_contact     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    host_and_port    TEXT    NOT NULL,
    cpu              INTEGER NOT NULL,
    ram              INTEGER NOT NULL,
    gpu              REAL    NOT NULL,
    unschedulable    INTEGER NOT NULL DEFAULT 0,
    restart_request  TEXT
);
CREATE INDEX harmony_machines_host_and_port ON harmony_machines (host_and_port);
CREATE INDEX harmony_machines_last_contact ON harmony_machines (last_contact);

CREATE TABLE harmony_machine_details (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    machine_id    INTEGER NOT NULL UNIQUE REFERENCES harmony_machines (id) ON DELETE CASCADE,
    tasks         TEXT    NOT NULL DEFAULT '',
    layers        TEXT    NOT NULL DEFAULT '',
    startup_time  TEXT    NOT NULL,
    machine_name  TEXT    NOT NULL DEFAULT '',
    version       TEXT    NOT NULL DEFAULT ''
);

CREATE TABLE harmony_task (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL,
    posted_time    TEXT    NOT NULL,
    update_time    TEXT    NOT NULL,
    owner_id       INTEGER REFERENCES harmony_machines (id) ON DELETE SET NULL,
    added_by       INTEGER NOT NULL,
    retries        INTEGER NOT NULL DEFAULT 0,
    previous_task  INTEGER
);
-- The poll and the claim read the oldest unowned tasks of a type through this index only.
CREATE INDEX harmony_task_unowned ON harmony_task (name, posted_time, id) WHERE owner_id IS NULL;
CREATE INDEX harmony_task_owner ON harmony_task (owner_id);

CREATE TABLE harmony_task_history (
    id                          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id                     INTEGER NOT NULL,
    name                        TEXT    NOT NULL,
    posted                      TEXT    NOT NULL,
    work_start                  TEXT    NOT NULL,
    work_end                    TEXT    NOT NULL,
    result                      INTEGER NOT NULL,
    err                         TEXT    NOT NULL DEFAULT '',
    completed_by_host_and_port  TEXT    NOT NULL
);
CREATE INDEX harmony_task_history_work_end ON harmony_task_history (work_end DESC);
CREATE INDEX harmony_task_history_task_id ON harmony_task_history (task_id);
CREATE INDEX harmony_task_history_name_work_end ON harmony_task_history (name, work_end DESC);

CREATE TABLE harmony_task_singletons (
    task_name        TEXT    PRIMARY KEY,
    task_id          INTEGER REFERENCES harmony_task (id) ON DELETE SET NULL,
    last_run_time    TEXT,
    run_now_request  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX harmony_task_singletons_task_id ON harmony_task_singletons (task_id);

CREATE TABLE harmony_task_follow (
    from_type        TEXT    NOT NULL,
    to_type          TEXT    NOT NULL,
    last_history_id  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (from_type, to_type)
);

CREATE TABLE harmony_config (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    title      TEXT    NOT NULL UNIQUE,
    config     TEXT    NOT NULL,
    timestamp  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE TABLE harmony_config_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       TEXT    NOT NULL,
    config      TEXT    NOT NULL,
    changed_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE INDEX harmony_config_history_title ON harmony_config_history (title, changed_at DESC);

CREATE TABLE storage_path (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    host_and_port   TEXT    NOT NULL,
    local_path      TEXT    NOT NULL,
    weight          INTEGER NOT NULL DEFAULT 10,
    capacity        INTEGER NOT NULL,
    available       INTEGER NOT NULL,
    reserved        INTEGER NOT NULL DEFAULT 0,
    can_seal        INTEGER NOT NULL DEFAULT 1,
    can_store       INTEGER NOT NULL DEFAULT 1,
    last_heartbeat  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    UNIQUE (host_and_port, local_path)
);

CREATE TABLE storage_reservation (
    task_id   INTEGER NOT NULL REFERENCES harmony_task (id) ON DELETE CASCADE,
    path_id   INTEGER NOT NULL REFERENCES storage_path (id) ON DELETE CASCADE,
    bytes     INTEGER NOT NULL,
    PRIMARY KEY (task_id, path_id)
);
CREATE INDEX storage_reservation_path ON storage_reservation (path_id);

-- Harmony schema, Postgres dialect (kept compatible with YugabyteDB and CockroachDB).
-- Mirrors sqlite/0001_init.sql table for table. Tables are never schema-qualified: the
-- connection's search_path selects the schema.

CREATE TABLE harmony_machines (
    id               BIGSERIAL PRIMARY KEY,
    last_contact     TIMESTAMPTZ      NOT NULL DEFAULT now(),
    host_and_port    VARCHAR(300)     NOT NULL,
    cpu              BIGINT           NOT NULL,
    ram              BIGINT           NOT NULL,
    gpu              DOUBLE PRECISION NOT NULL,
    unschedulable    BOOLEAN          NOT NULL DEFAULT FALSE,
    restart_request  TIMESTAMPTZ
);
CREATE INDEX harmony_machines_host_and_port ON harmony_machines (host_and_port);
CREATE INDEX harmony_machines_last_contact ON harmony_machines (last_contact);

CREATE TABLE harmony_machine_details (
    id            BIGSERIAL PRIMARY KEY,
    machine_id    BIGINT      NOT NULL UNIQUE REFERENCES harmony_machines (id) ON DELETE CASCADE,
    tasks         TEXT        NOT NULL DEFAULT '',
    layers        TEXT        NOT NULL DEFAULT '',
    startup_time  TIMESTAMPTZ NOT NULL,
    machine_name  TEXT        NOT NULL DEFAULT '',
    version       TEXT        NOT NULL DEFAULT ''
);

CREATE TABLE harmony_task (
    id             BIGSERIAL PRIMARY KEY,
    name           VARCHAR(16) NOT NULL,
    posted_time    TIMESTAMPTZ NOT NULL,
    update_time    TIMESTAMPTZ NOT NULL,
    owner_id       BIGINT REFERENCES harmony_machines (id) ON DELETE SET NULL,
    added_by       BIGINT      NOT NULL,
    retries        BIGINT      NOT NULL DEFAULT 0,
    previous_task  BIGINT
);
-- The poll and the claim read the oldest unowned tasks of a type through this index only.
CREATE INDEX harmony_task_unowned ON harmony_task (name, posted_time, id) WHERE owner_id IS NULL;
CREATE INDEX harmony_task_owner ON harmony_task (owner_id);

CREATE TABLE harmony_task_history (
    id                          BIGSERIAL PRIMARY KEY,
    task_id                     BIGINT       NOT NULL,
    name                        VARCHAR(16)  NOT NULL,
    posted                      TIMESTAMPTZ  NOT NULL,
    work_start                  TIMESTAMPTZ  NOT NULL,
    work_end                    TIMESTAMPTZ  NOT NULL,
    result                      BOOLEAN      NOT NULL,
    err                         TEXT         NOT NULL DEFAULT '',
    completed_by_host_and_port  VARCHAR(300) NOT NULL
);
CREATE INDEX harmony_task_history_work_end ON harmony_task_history (work_end DESC);
CREATE INDEX harmony_task_history_task_id ON harmony_task_history (task_id);
CREATE INDEX harmony_task_history_name_work_end ON harmony_task_history (name, work_end DESC);

CREATE TABLE harmony_task_singletons (
    task_name        VARCHAR(255) PRIMARY KEY,
    task_id          BIGINT REFERENCES harmony_task (id) ON DELETE SET NULL,
    last_run_time    TIMESTAMPTZ,
    run_now_request  BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX harmony_task_singletons_task_id ON harmony_task_singletons (task_id);

CREATE TABLE harmony_task_follow (
    from_type        VARCHAR(16) NOT NULL,
    to_type          VARCHAR(16) NOT NULL,
    last_history_id  BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (from_type, to_type)
);

CREATE TABLE harmony_config (
    id         BIGSERIAL PRIMARY KEY,
    title      VARCHAR(300) NOT NULL UNIQUE,
    config     TEXT         NOT NULL,
    timestamp  TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE TABLE harmony_config_history (
    id          BIGSERIAL PRIMARY KEY,
    title       VARCHAR(300) NOT NULL,
    config      TEXT         NOT NULL,
    changed_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX harmony_config_history_title ON harmony_config_history (title, changed_at DESC);

CREATE TABLE storage_path (
    id              BIGSERIAL PRIMARY KEY,
    host_and_port   VARCHAR(300) NOT NULL,
    local_path      TEXT         NOT NULL,
    weight          BIGINT       NOT NULL DEFAULT 10,
    capacity        BIGINT       NOT NULL,
    available       BIGINT       NOT NULL,
    reserved        BIGINT       NOT NULL DEFAULT 0,
    can_seal        BOOLEAN      NOT NULL DEFAULT TRUE,
    can_store       BOOLEAN      NOT NULL DEFAULT TRUE,
    last_heartbeat  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    UNIQUE (host_and_port, local_path)
);

CREATE TABLE storage_reservation (
    task_id   BIGINT NOT NULL REFERENCES harmony_task (id) ON DELETE CASCADE,
    path_id   BIGINT NOT NULL REFERENCES storage_path (id) ON DELETE CASCADE,
    bytes     BIGINT NOT NULL,
    PRIMARY KEY (task_id, path_id)
);
CREATE INDEX storage_reservation_path ON storage_reservation (path_id);

-- One row per task type with a cluster-wide limit (max_cluster). A claim of such a type first
-- upserts its row, which serialises claims of that type across the cluster until commit, so
-- the count of running tasks it then reads cannot be raced.
CREATE TABLE harmony_task_type_lock (
    name  VARCHAR(16) PRIMARY KEY
);

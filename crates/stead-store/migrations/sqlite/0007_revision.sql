-- A change-driven control plane: see the PostgreSQL migration. SQLite has
-- one writer at a time, so plain row triggers bump the revision.
CREATE TABLE intended_rev (
    id BIGINT PRIMARY KEY,
    rev BIGINT NOT NULL,
    xid BIGINT NOT NULL DEFAULT 0
);
INSERT INTO intended_rev (id, rev, xid) VALUES (1, 0, 0);

CREATE TRIGGER apps_rev_insert AFTER INSERT ON apps BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER apps_rev_delete AFTER DELETE ON apps BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER apps_rev_update AFTER UPDATE ON apps
    WHEN OLD.active_version IS NOT NEW.active_version
      OR OLD.target_version IS NOT NEW.target_version
      OR OLD.min_instances <> NEW.min_instances
      OR OLD.max_instances <> NEW.max_instances
      OR OLD.name <> NEW.name
    BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER versions_rev_insert AFTER INSERT ON versions BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER versions_rev_delete AFTER DELETE ON versions BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER versions_rev_update AFTER UPDATE ON versions
    WHEN OLD.state <> NEW.state
      OR OLD.artifact_hash IS NOT NEW.artifact_hash
      OR OLD.config <> NEW.config
      OR OLD.hold <> NEW.hold
    BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER instances_rev_insert AFTER INSERT ON instances BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER instances_rev_update AFTER UPDATE ON instances BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER instances_rev_delete AFTER DELETE ON instances BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER hosts_rev_insert AFTER INSERT ON hosts BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER hosts_rev_delete AFTER DELETE ON hosts BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER hosts_rev_update AFTER UPDATE ON hosts
    WHEN OLD.draining <> NEW.draining
      OR OLD.generation <> NEW.generation
      OR OLD.memory_mb <> NEW.memory_mb
      OR OLD.backends <> NEW.backends
    BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_state_rev_insert AFTER INSERT ON scale_state BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_state_rev_delete AFTER DELETE ON scale_state BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_state_rev_update AFTER UPDATE ON scale_state
    WHEN OLD.desired <> NEW.desired OR OLD.version IS NOT NEW.version
    BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_overrides_rev_insert AFTER INSERT ON scale_overrides BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_overrides_rev_update AFTER UPDATE ON scale_overrides BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER scale_overrides_rev_delete AFTER DELETE ON scale_overrides BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER env_vars_rev_insert AFTER INSERT ON env_vars BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER env_vars_rev_update AFTER UPDATE ON env_vars BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER env_vars_rev_delete AFTER DELETE ON env_vars BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER app_databases_rev_insert AFTER INSERT ON app_databases BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER app_databases_rev_update AFTER UPDATE ON app_databases BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER app_databases_rev_delete AFTER DELETE ON app_databases BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER executors_rev_insert AFTER INSERT ON executors BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER executors_rev_update AFTER UPDATE ON executors BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;
CREATE TRIGGER executors_rev_delete AFTER DELETE ON executors BEGIN UPDATE intended_rev SET rev = rev + 1 WHERE id = 1; END;

ALTER TABLE hosts ADD COLUMN observed_digest TEXT NOT NULL DEFAULT '';
ALTER TABLE scale_state ADD COLUMN settled BIGINT NOT NULL DEFAULT 0;
CREATE INDEX scale_state_unsettled ON scale_state (settled);
CREATE INDEX apps_target ON apps (target_version) WHERE target_version IS NOT NULL;

-- A change-driven control plane. Every change of what hosts should run
-- bumps one revision, in the transaction that makes it (triggers, so that
-- no write path can forget it); a heartbeat reads it with one query and
-- recomputes the intended state only when it moved (the computed state is
-- cached per replica under the revision: a cache, never the truth). The
-- triggers are deferred to commit, so the revision row is locked last in
-- every transaction (no lock-order deadlock with the rows they change),
-- and bump it once per transaction however many rows change.
CREATE TABLE intended_rev (
    id BIGINT PRIMARY KEY,
    rev BIGINT NOT NULL,
    xid BIGINT NOT NULL DEFAULT 0
);
INSERT INTO intended_rev (id, rev, xid) VALUES (1, 0, 0);

CREATE FUNCTION stead_bump_intended_rev() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE intended_rev SET rev = rev + 1, xid = txid_current()
     WHERE id = 1 AND xid <> txid_current();
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER apps_rev AFTER INSERT OR DELETE ON apps
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER apps_rev_update AFTER UPDATE ON apps
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.active_version IS DISTINCT FROM NEW.active_version
          OR OLD.target_version IS DISTINCT FROM NEW.target_version
          OR OLD.min_instances <> NEW.min_instances
          OR OLD.max_instances <> NEW.max_instances
          OR OLD.name <> NEW.name)
    EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER versions_rev AFTER INSERT OR DELETE ON versions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER versions_rev_update AFTER UPDATE ON versions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.state <> NEW.state
          OR OLD.artifact_hash IS DISTINCT FROM NEW.artifact_hash
          OR OLD.config <> NEW.config
          OR OLD.hold <> NEW.hold)
    EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER instances_rev AFTER INSERT OR UPDATE OR DELETE ON instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER hosts_rev AFTER INSERT OR DELETE ON hosts
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER hosts_rev_update AFTER UPDATE ON hosts
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.draining <> NEW.draining
          OR OLD.generation <> NEW.generation
          OR OLD.memory_mb <> NEW.memory_mb
          OR OLD.backends <> NEW.backends)
    EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER scale_state_rev AFTER INSERT OR DELETE ON scale_state
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER scale_state_rev_update AFTER UPDATE ON scale_state
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.desired <> NEW.desired OR OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER scale_overrides_rev AFTER INSERT OR UPDATE OR DELETE ON scale_overrides
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER env_vars_rev AFTER INSERT OR UPDATE OR DELETE ON env_vars
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER app_databases_rev AFTER INSERT OR UPDATE OR DELETE ON app_databases
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();
CREATE CONSTRAINT TRIGGER executors_rev AFTER INSERT OR UPDATE OR DELETE ON executors
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION stead_bump_intended_rev();

-- A heartbeat that reports what the host reported last (same digest of its
-- observed instances) writes only the host's heartbeat time, not its
-- instance rows.
ALTER TABLE hosts ADD COLUMN observed_digest TEXT NOT NULL DEFAULT '';

-- The autoscaler evaluates every app when the revision moves, and in
-- between only the apps that are not settled (a pending scale-down, a
-- panic window, a count away from min, e.g. waiting for the idle timeout)
-- or that have fresh demand: the index finds the few unsettled ones.
ALTER TABLE scale_state ADD COLUMN settled BIGINT NOT NULL DEFAULT 0;
CREATE INDEX scale_state_unsettled ON scale_state (settled);

-- Pending targets, which a heartbeat must promote even when it reports
-- nothing new (a rollback to a version whose instance is already ready).
CREATE INDEX apps_target ON apps (target_version) WHERE target_version IS NOT NULL;

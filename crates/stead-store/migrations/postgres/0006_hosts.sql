-- Hosts: draining (no new instances; what runs is replaced elsewhere) and a
-- fencing generation. A host that comes back after being judged dead gets
-- its generation raised; every instance it reported before (or reports in
-- the heartbeat that brings it back) keeps the old generation and is
-- therefore stale: not routed, not counted by placement, stopped by its
-- agent. Instances first seen later take the host's current generation.
ALTER TABLE hosts ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

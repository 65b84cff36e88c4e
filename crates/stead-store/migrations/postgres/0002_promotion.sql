-- A built version first becomes the app's target; it is made active (and
-- receives traffic) only once one of its instances is ready, so a version
-- that cannot start never replaces one that serves.
ALTER TABLE apps ADD COLUMN target_version BIGINT;
ALTER TABLE versions ADD COLUMN exits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE versions ADD COLUMN ever_ready BIGINT NOT NULL DEFAULT 0;
-- Versions active before this migration have evidently been ready.
UPDATE versions SET ever_ready = 1
 WHERE EXISTS (SELECT 1 FROM apps a WHERE a.id = versions.app_id AND a.active_version = versions.number);

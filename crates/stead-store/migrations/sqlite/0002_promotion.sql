-- A built version first becomes the app's target; it is made active (and
-- receives traffic) only once one of its instances is ready, so a version
-- that cannot start never replaces one that serves.
ALTER TABLE apps ADD COLUMN target_version INTEGER;
ALTER TABLE versions ADD COLUMN exits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE versions ADD COLUMN ever_ready INTEGER NOT NULL DEFAULT 0;

-- How often workers stopping have handed the job back, each without using an attempt: a job
-- longer than the gap between rolling restarts was handed back at every one and never ended.
-- Past a bound (`store::FREE_HAND_BACKS`), a hand-back uses an attempt. A retry by hand starts
-- the count again.
ALTER TABLE jobs ADD COLUMN hand_backs integer NOT NULL DEFAULT 0;

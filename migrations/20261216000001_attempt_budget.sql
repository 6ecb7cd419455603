-- The attempts a retry grants: the budget the job was submitted with. A hand-back raises
-- max_attempts by one (that attempt does not count), so a retry cannot read the budget there,
-- and `attempt + max_attempts` doubled it at each retry. Set by the first hand-back or retry.
ALTER TABLE jobs ADD COLUMN attempt_budget integer;
